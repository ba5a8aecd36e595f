"""Classes in chunks: what lets a method take a vocabulary of 847 classes in bounded memory.

Per-class layers (a cost embedding, a decoder stage, bilinear upsampling) treat every class alike,
so they can run on a few classes at a time. Without autograd (inference) the chunks are written
into one preallocated output (:func:`write_classes`) instead of being concatenated, so the full
``B×K×...`` tensor exists once; with autograd (training) they are concatenated, which the backward
pass needs. The same chunks give the same bits either way.

A method that runs only a subset of the vocabulary per image (DCP-CLIP's selected classes) batches
the subsets padded to the largest (:func:`pad_class_subsets`) and scatters the results back into
the whole vocabulary (:func:`scatter_class_subsets`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Classes per chunk when upsampling logits. CPU bilinear resizing rounds differently for different
# numbers of maps, so every caller uses this chunk for results that agree to the bit.
UPSAMPLE_CHUNK = 64

# Class slice → a tensor of those classes, built on demand (a streamed decoder's stage input).
ClassSource = Callable[[slice], Tensor]


def class_slices(classes: int, chunk: int) -> list[slice]:
    """The chunks of ``classes`` classes, ``chunk`` at a time (as ``Tensor.split`` cuts them)."""
    if chunk < 1:
        raise ValueError(f"A chunk of classes must hold at least one class; got {chunk}.")
    return [slice(start, min(start + chunk, classes)) for start in range(0, classes, chunk)]


def write_classes(
    buffer: Tensor | None, part: Tensor, index: slice, classes: int, dim: int = 1
) -> Tensor:
    """Write ``part`` into the classes ``index`` (axis ``dim``) of ``buffer`` and return it; the
    buffer, with ``classes`` classes on that axis, is allocated at the first chunk (None)."""
    if buffer is None:
        shape = list(part.shape)
        shape[dim] = classes
        buffer = part.new_empty(shape)
    buffer[(slice(None),) * dim + (index,)] = part
    return buffer


def join_classes(
    parts: Iterable[tuple[slice, Tensor]],
    size: int,
    *,
    dim: int = 1,
    buffer: Tensor | None = None,
) -> Tensor:
    """Chunks ``(index, part)`` of an axis (``dim``, classes by default) of length ``size`` as one
    tensor.

    With autograd they are concatenated (the backward pass needs every chunk); without, each is
    written into one buffer as it comes, so only one chunk's temporaries exist at a time. The
    buffer is ``buffer`` when given, which may be the tensor the chunks are computed from: each
    chunk is read before it is overwritten. The same chunks give the same bits either way.
    """
    if torch.is_grad_enabled():
        return torch.cat([part for _, part in parts], dim=dim)
    for index, part in parts:
        buffer = write_classes(buffer, part, index, size, dim)
    return buffer


def each_class(module: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a per-class ``N×C×s×s`` module to every class of ``B×K×C×s×s`` at once."""
    return module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def per_class(module: Callable[[Tensor], Tensor], x: Tensor, chunk: int) -> Tensor:
    """Apply a per-class ``N×C×s×s`` module to ``B×K×C×s×s``, ``chunk`` classes at a time."""
    classes = x.shape[1]
    slices = class_slices(classes, chunk)
    return join_classes(((index, each_class(module, x[:, index])) for index in slices), classes)


def classes_of(x: Tensor) -> ClassSource:
    """Class slice → those classes of ``x`` (``B×K×...``)."""
    return lambda index: x[:, index]


def pad_class_subsets(selected: Tensor) -> tuple[Tensor, Tensor]:
    """Each image's classes of a ``B×K`` bool selection as one ``B×S`` index tensor, S the largest
    subset of the batch, and its ``B×S`` mask of real entries.

    The indices of an image are sorted; its padding repeats its first class, so every entry is a
    valid class. Every image must select at least one class.
    """
    rows = [row.nonzero().flatten().tolist() for row in selected]
    width = max(len(row) for row in rows)
    indices = [row + [row[0]] * (width - len(row)) for row in rows]
    mask = [[True] * len(row) + [False] * (width - len(row)) for row in rows]
    device = selected.device
    return torch.tensor(indices, dtype=torch.long, device=device), torch.tensor(mask, device=device)


def scatter_class_subsets(
    values: Tensor, indices: Tensor, mask: Tensor, classes: int, fill: float
) -> Tensor:
    """``B×S×...`` values of the classes :func:`pad_class_subsets` gave → ``B×K×...``, ``fill``
    for the classes an image did not select."""
    images = []
    for image_values, image_indices, image_mask in zip(values, indices, mask, strict=True):
        full = image_values.new_full((classes, *image_values.shape[1:]), fill)
        images.append(full.index_copy(0, image_indices[image_mask], image_values[image_mask]))
    return torch.stack(images)


def resize_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinearly resize ``B×K×h×w`` logits to ``size`` in one call (a loss's resize)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def upsample_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinearly resize ``B×K×h×w`` logits to ``size``, :data:`UPSAMPLE_CHUNK` classes at a time
    to bound peak memory; without autograd the chunks are written into the output, so
    ``B×K×H×W`` exists once."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    slices = class_slices(logits.shape[1], UPSAMPLE_CHUNK)
    if torch.is_grad_enabled():
        return torch.cat([resize_logits(logits[:, index], size) for index in slices], dim=1)
    output = logits.new_empty((*logits.shape[:2], *size))
    for index in slices:
        output[:, index] = resize_logits(logits[:, index], size)
    return output


def upsampled_argmax(logits: Tensor, size: Sequence[int]) -> Tensor:
    """``upsample_logits(logits, size).argmax(dim=1)`` (``B×H×W``) without ``B×K×H×W``: a running
    argmax over chunks of upsampled classes (the first maximum wins and NaN beats all, as in
    ``argmax``)."""
    best = labels = None
    for index in class_slices(logits.shape[1], UPSAMPLE_CHUNK):
        part = resize_logits(logits[:, index], size)
        winner = part.argmax(dim=1, keepdim=True)
        value = part.gather(1, winner)[:, 0]
        winner = winner[:, 0] + index.start
        del part
        if best is None:
            best, labels = value, winner
            continue
        better = (value > best) | (value.isnan() & ~best.isnan())
        best = torch.where(better, value, best)
        labels = torch.where(better, winner, labels)
    return labels
