"""Layers shared by the methods: cosine cost volumes, their per-slice embedding and convolution,
and the U-Net fusion block of the cost-volume decoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cosine_cost_volume(
    image_embeddings: Tensor, class_embeddings: Tensor, *, per_image: bool = False
) -> Tensor:
    """Cosine similarity between every pixel embedding and every class (and template) embedding.

    Arguments:
        image_embeddings: ``B×D×h×w``.
        class_embeddings: ``K×D`` or ``K×M×D`` (one per template or prompt) shared by the batch;
            with ``per_image=True``, ``B×K×D`` or ``B×K×M×D`` (e.g. DPSeg's Inference II prompts).
        per_image: whether the leading axis of ``class_embeddings`` is the batch.

    Returns:
        ``B×K×h×w`` when there is no template axis, else ``B×K×M×h×w``; values in [-1, 1].
    """
    if image_embeddings.ndim != 4:
        raise ValueError(f"image_embeddings must be B×D×h×w; got {tuple(image_embeddings.shape)}.")
    if image_embeddings.shape[1] != class_embeddings.shape[-1]:
        raise ValueError(
            f"Embedding sizes differ: image {image_embeddings.shape[1]}, "
            f"class {class_embeddings.shape[-1]} (class tensor {tuple(class_embeddings.shape)})."
        )
    pixels = F.normalize(image_embeddings, dim=1)
    classes = F.normalize(class_embeddings, dim=-1)
    equations = {
        (False, 2): "bdhw,kd->bkhw",
        (False, 3): "bdhw,kmd->bkmhw",
        (True, 3): "bdhw,bkd->bkhw",
        (True, 4): "bdhw,bkmd->bkmhw",
    }
    equation = equations.get((per_image, classes.ndim))
    if equation is None:
        expected = "B×K×D or B×K×M×D" if per_image else "K×D or K×M×D"
        raise ValueError(f"class_embeddings must be {expected}; got {tuple(classes.shape)}.")
    if per_image and classes.shape[0] != pixels.shape[0]:
        raise ValueError(
            f"Per-image class embeddings for {classes.shape[0]} images, batch of {pixels.shape[0]}."
        )
    return torch.einsum(equation, pixels, classes)


def convolved_cost_volume(conv: nn.Conv2d, features: Tensor, prototypes: Tensor) -> Tensor:
    """``conv`` (M → g channels, stride 1, zero "same" padding) applied to every class slice of
    the cosine cost volume ``cosine_cost_volume(features, prototypes, per_image=True)``:
    ``B×D×H×W`` features and ``B×K×M×D`` prototypes → ``B×K×g×H×W``.

    The cosine is linear in the normalised features, so the convolution folds into the
    prototypes: ``Σ_m Σ_o W[c, m, o] · p̂_{k,m} · ê(x+o) = Σ_o ê(x+o) · Q[k, c, o]`` with
    ``Q[k, c, o] = Σ_m W[c, m, o] p̂_{k,m}``, a convolution of the normalised features with K·g
    prototype-derived filters (zero padding of the volume equals zero padding of the features).
    The folded form never builds the ``B×K×M×H×W`` volume; it runs when it needs fewer
    multiply-adds per class and pixel (``k²·g·D`` against ``M·D + k²·M·g`` for a k×k kernel).
    """
    prompts, outputs = conv.in_channels, conv.out_channels
    dim = features.shape[1]
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    if taps * outputs * dim > prompts * dim + taps * prompts * outputs:
        volume = cosine_cost_volume(features, prototypes, per_image=True)
        return conv(volume.flatten(0, 1)).unflatten(0, volume.shape[:2])
    batch, channels, height, width = features.shape
    classes = prototypes.shape[1]
    filters = torch.einsum("gmyx,bkmd->bkgdyx", conv.weight, F.normalize(prototypes, dim=-1))
    convolved = F.conv2d(
        F.normalize(features, dim=1).reshape(1, batch * channels, height, width),
        filters.reshape(batch * classes * outputs, channels, *conv.kernel_size),
        padding=conv.padding,
        groups=batch,
    )
    convolved = convolved.view(batch, classes, outputs, height, width)
    if conv.bias is not None:
        convolved += conv.bias.view(1, 1, -1, 1, 1)  # in place: a fresh conv output
    return convolved


class CostEmbedding(nn.Module):
    """Embed each class slice of a ``B×K×M×h×w`` cost volume into ``C`` channels with one conv.

    The same convolution is applied to every class, so the layer works for any K (CAT-Seg's cost
    embedding; DPSeg's and DCP-CLIP's ``F_cv``).
    """

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: int = 7) -> None:
        """
        Arguments:
            in_channels: M, the number of templates or prompts per class.
            out_channels: C, the embedding width.
            kernel_size: spatial kernel of the convolution (odd).
        """
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, cost_volume: Tensor) -> Tensor:
        """``B×K×M×h×w`` → ``B×K×C×h×w``."""
        batch, classes, templates, height, width = cost_volume.shape
        embedded = self.conv(cost_volume.reshape(batch * classes, templates, height, width))
        return embedded.view(batch, classes, -1, height, width)


def group_count(channels: int) -> int:
    """GroupNorm groups for ``channels``: CAT-Seg's and SED's ``channels // 16``, lowered until it
    divides ``channels``."""
    groups = max(1, channels // 16)
    while channels % groups:
        groups -= 1
    return groups


class DoubleConv(nn.Sequential):
    """(3×3 conv → GroupNorm → ReLU) × 2: the U-Net fusion block of CAT-Seg's and SED's decoders
    (:func:`group_count` groups)."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        groups = group_count(out_channels)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )

    def fuse_classes(self, parts: list[Tensor]) -> Tensor:
        """The block on each class of ``B×c×C_i×h×w`` parts concatenated along their channels →
        ``B×c×C_out×h×w``. ``parts`` is emptied, and the concatenation freed as soon as the first
        convolution has read it: at a decoder's finest stage it is a chunk's largest tensor."""
        batch, classes = parts[0].shape[:2]
        x = torch.cat(parts, dim=2).flatten(0, 1)
        parts.clear()
        first, *rest = self
        x = first(x)  # rebinding x frees the concatenation
        for layer in rest:
            x = layer(x)
        return x.unflatten(0, (batch, classes))
