"""ovseg's training-free fallbacks: what a method runs with real weights and no trained head.

They are ovseg's additions, not the papers' (DESIGN §5): each reuses the method's parameter-free
steps on a pretrained CLIP (and SAM) so that the method answers something sensible before any
head is trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.backbones import SamBackbone
from ovseg.backbones.sam import load_sam
from ovseg.methods.base import SegmentationOutput
from ovseg.methods.chunking import class_slices, upsample_logits

if TYPE_CHECKING:
    from ovseg.methods.esc_net import PseudoPrompts


class TrainingFreeSam:
    """The full pretrained SAM (image encoder included) of ESC-Net's training-free path, read
    from its checkpoint the first time that path runs: it is no submodule of the method (not in
    its weights or optimiser), so a trained head never holds it, and the shallow copies the demo
    makes of the method share one loaded SAM.

    Attributes:
        loaded: the SAM once loaded (None before, and always with ``pretrained=False``).
    """

    def __init__(self, name: str, checkpoint: str | None, *, pretrained: bool) -> None:
        """``name`` and ``checkpoint`` as for :func:`load_sam`; ``pretrained=False`` (Table 2 b)
        leaves the path without a SAM."""
        self.name, self.checkpoint, self.pretrained = name, checkpoint, pretrained
        self.loaded: SamBackbone | None = None

    def on(self, device: torch.device) -> SamBackbone | None:
        """The SAM on ``device``, loaded on first use; None without a pretrained one."""
        if not self.pretrained:
            return None
        if self.loaded is None:
            self.loaded = load_sam(self.name, self.checkpoint)
        return self.loaded.to(device)


@torch.no_grad()
def sam_prompted_logits(
    cost_volume: Tensor,
    *,
    prompt_generator: Callable[[Tensor], PseudoPrompts],
    sam: SamBackbone | None,
    sam_embeddings: Tensor | None,
    stride: int,
    input_size: tuple[int, int],
    temperature: float,
    class_chunk_size: int,
    boxes: bool,
    return_intermediates: bool = False,
) -> SegmentationOutput:
    """ESC-Net's training-free path: pseudo prompts from the cost volume, decoded by the full
    pretrained SAM.

    Every region's peak point (and box) prompts SAM; a class's mask is the maximum over its
    region masks, and ``log p_CLIP(class) + log σ(SAM mask)`` labels each pixel by the class
    whose mask covers it and whose CLIP score agrees. Without a pretrained SAM the logits are the
    cosine scores over the temperature (dense CLIP).

    Arguments:
        cost_volume: ``B×K×h×w`` cosine scores of the MaskCLIP features.
        prompt_generator: ``R×h×w`` maps → their :class:`PseudoPrompts` (the method's PPG).
        sam: the full pretrained SAM (None without one).
        sam_embeddings: ``B×C×g×g`` its image embeddings of the images (None without a SAM).
        stride: CLIP's patch size, from grid cells to pixels.
        input_size: ``(H, W)`` of the images, the logits' size.
        temperature: divides the cosine scores into class probabilities.
        class_chunk_size: classes prompted at a time.
        boxes: prompt SAM with each region's box as well as its point.
        return_intermediates: also return ``cost_volume``, ``sam_masks`` (``B×K×H×W``
            probabilities) and ``pseudo_prompts`` (one set: the PPG's prompts per chunk).
    """
    batch, classes = cost_volume.shape[:2]
    class_log_prob = upsample_logits((cost_volume / temperature).log_softmax(dim=1), input_size)
    if sam_embeddings is None:
        intermediates = {"cost_volume": cost_volume} if return_intermediates else {}
        return SegmentationOutput(logits=class_log_prob, intermediates=intermediates)
    scale = sam.image_size / max(input_size)  # SAM's ResizeLongestSide
    logits = torch.empty_like(class_log_prob)
    sam_masks = torch.empty_like(class_log_prob) if return_intermediates else None
    prompts = []
    for chunk in class_slices(classes, class_chunk_size):
        chunk_prompts = prompt_generator(cost_volume[:, chunk].flatten(0, 1))
        prompts.append(chunk_prompts)
        points = (chunk_prompts.points + 0.5) * stride * scale
        # Inclusive grid boxes → inclusive pixel boxes: from a region's first pixel to its last
        # one, the frame SAM's predictor gives its prompt encoder.
        last_pixel = chunk_prompts.boxes.new_tensor([0, 0, stride - 1, stride - 1])
        pixel_boxes = (chunk_prompts.boxes * stride + last_pixel) * scale
        chunk_size = chunk.stop - chunk.start
        objects = chunk_prompts.points.shape[1]
        for image in range(batch):
            maps = slice(image * chunk_size, (image + 1) * chunk_size)
            coords = points[maps].reshape(-1, 1, 2)
            mask_logits, _ = sam.decode(
                sam_embeddings[image : image + 1],
                points=(coords, torch.ones(coords.shape[:2], device=coords.device)),
                boxes=pixel_boxes[maps].reshape(-1, 4) if boxes else None,
            )
            mask_logits = mask_logits.view(-1, objects, *mask_logits.shape[-2:])
            mask_logits = sam.postprocess_masks(
                mask_logits.amax(dim=1)[None], original_size=input_size
            )
            log_mask = F.logsigmoid(mask_logits[0].to(logits.dtype))
            logits[image, chunk] = class_log_prob[image, chunk] + log_mask
            if sam_masks is not None:
                sam_masks[image, chunk] = log_mask.exp()
    intermediates: dict[str, Any] = {}
    if return_intermediates:
        intermediates = {
            "cost_volume": cost_volume,
            "sam_masks": sam_masks,
            "pseudo_prompts": [prompts],
        }
    return SegmentationOutput(logits=logits, intermediates=intermediates)
