"""The per-pixel losses the methods train with, over one-hot class maps.

Every method scores each class on its own (a sigmoid per class map, not a softmax over the
vocabulary), so the targets are ``B×K×H×W`` one-hot maps built from a ``B×H×W`` index map in which
``IGNORE_INDEX`` marks unlabelled pixels. What differs between papers is what an unlabelled pixel
counts as and how the sum is normalised, which is what the arguments here choose.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ovseg.methods.base import IGNORE_INDEX

IGNORE_POLICIES = ("negative", "exclude")
LN2 = math.log(2.0)


class _BinaryCrossEntropyWithLogits(torch.autograd.Function):
    """``F.binary_cross_entropy_with_logits(reduction="none")``, the same to float32 rounding
    (one ulp) and about twice as fast on a CPU, forward and backward together.

    PyTorch's CPU kernel evaluates ``log1p`` one element at a time; here the softplus is
    ``max(x, 0) + log2(1 + e^{-|x|}) · ln 2`` with vectorised ``exp`` and ``log2``, and the
    gradient is the exact ``(σ(x) − y) · g``, so no intermediate is kept for the backward pass.
    On the toy heads' full-resolution targets this is a large part of a training step.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        ctx.save_for_backward(logits, targets)
        softplus = logits.clamp_min(0) + torch.log2(1 + torch.exp(-logits.abs())) * LN2
        return softplus - logits * targets

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        logits, targets = ctx.saved_tensors
        grad_targets = None
        if ctx.needs_input_grad[1]:
            grad_targets = -grad * logits
        return grad * (torch.sigmoid(logits) - targets), grad_targets


def binary_cross_entropy_with_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """Elementwise binary cross-entropy of logits against targets in [0, 1] (see
    :class:`_BinaryCrossEntropyWithLogits`), in float32 under autocast too, as PyTorch's is."""
    return _BinaryCrossEntropyWithLogits.apply(logits.float(), targets.float())


def one_hot_targets(target: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``B×K×H×W`` one-hot maps of a ``B×H×W`` index map; unlabelled pixels are 0 in every map.

    Raises:
        ValueError: a labelled pixel's index is not a class below ``num_classes``.
    """
    target = target.long()
    labelled = target != IGNORE_INDEX
    if bool(((target < 0) | (target >= num_classes))[labelled].any()):
        raise ValueError(
            f"Targets must be class indices below K = {num_classes} or {IGNORE_INDEX}."
        )
    classes = torch.arange(num_classes, device=target.device)
    one_hot = (target[:, None] == classes[None, :, None, None]) & labelled[:, None]
    return one_hot.to(dtype)


def one_hot_bce(logits: Tensor, target: Tensor, *, ignore: str = "exclude") -> Tensor:
    """Per-pixel sigmoid binary cross-entropy of ``B×K×H×W`` logits against one-hot targets.

    Arguments:
        logits: class scores at the target's resolution.
        target: ``B×H×W`` class indices, ``IGNORE_INDEX`` where unlabelled.
        ignore: ``"negative"``: an unlabelled pixel is a negative of every class and the mean runs
            over all ``B·K·H·W`` elements (SED); ``"exclude"``: unlabelled pixels do not count and
            the mean runs over labelled pixels × K.
    """
    if ignore not in IGNORE_POLICIES:
        raise ValueError(f"ignore must be one of {list(IGNORE_POLICIES)}; got {ignore!r}.")
    num_classes = logits.shape[1]
    one_hot = one_hot_targets(target, num_classes, logits.dtype)
    losses = binary_cross_entropy_with_logits(logits, one_hot)
    if ignore == "negative":
        return losses.mean()
    labelled = target != IGNORE_INDEX
    counted = labelled.sum() * num_classes
    return (losses * labelled[:, None].to(losses.dtype)).sum() / counted.clamp_min(1)


def mean_over_ranks(count: Tensor) -> Tensor:
    """The mean of ``count`` over DDP ranks (itself outside DDP): every rank divides by the same
    normaliser, so a rank whose crops hold few masks does not weigh its loss up (Mask2Former,
    ZegCLIP: all-reduce, then divide by the world size)."""
    if not (dist.is_available() and dist.is_initialized()):
        return count
    count = count.clone()
    dist.all_reduce(count)
    return count / dist.get_world_size()


def focal_dice_loss(
    logits: Tensor,
    target: Tensor,
    *,
    focal_weight: float = 100.0,
    dice_weight: float = 1.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    ignore_as_negative: bool = True,
) -> dict[str, Tensor]:
    """ZegCLIP's sigmoid focal + dice loss over one-hot class maps (LDVC, spec §4.2).

    Arguments:
        logits: ``B×K×H×W`` score maps at the target resolution.
        target: ``B×H×W`` class indices, ``IGNORE_INDEX`` where unlabelled.
        focal_weight, dice_weight: the weights of the two terms (100 and 1).
        alpha, gamma: focal-loss parameters.
        ignore_as_negative: ignored pixels count as negatives of every class in the focal term;
            False leaves them out of it (the dice term always counts every pixel).

    Returns:
        ``loss_focal`` and ``loss_dice``, both already weighted. Each focal map is averaged over
        its pixels; focal maps are summed over all ``B×K`` maps and dice over the maps of the
        classes present; both are divided by ``num_masks``, the present (image, class) pairs,
        averaged over DDP ranks and at least 1.
    """
    onehot = one_hot_targets(target, logits.shape[1], logits.dtype)  # B×K×H×W
    present = onehot.flatten(2).amax(dim=-1)  # B×K
    num_masks = mean_over_ranks(present.detach().float().sum()).clamp_min(1.0)
    probability = logits.sigmoid()
    cross_entropy = binary_cross_entropy_with_logits(logits, onehot)
    p_t = probability * onehot + (1 - probability) * (1 - onehot)
    alpha_t = alpha * onehot + (1 - alpha) * (1 - onehot)
    focal = alpha_t * cross_entropy * (1 - p_t) ** gamma
    if ignore_as_negative:
        focal_maps = focal.flatten(2).mean(dim=-1)
    else:
        labelled = (target != IGNORE_INDEX)[:, None].to(logits.dtype)
        focal_maps = (focal * labelled).flatten(2).sum(-1) / labelled.flatten(2).sum(-1).clamp_min(
            1.0
        )
    overlap = (probability * onehot).flatten(2).sum(-1)
    total = probability.flatten(2).sum(-1) + onehot.flatten(2).sum(-1)
    dice_maps = 1 - (2 * overlap + 1) / (total + 1)
    return {
        "loss_focal": focal_weight * focal_maps.sum() / num_masks,
        "loss_dice": dice_weight * (dice_maps * present).sum() / num_masks,
    }
