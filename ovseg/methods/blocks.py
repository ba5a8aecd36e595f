"""Layers shared by the methods: cosine cost volumes, their per-slice embedding, and the
U-Net fusion block of the cost-volume decoders."""

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
