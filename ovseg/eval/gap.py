"""The image–text modality gap of a CLIP, measured as Liang et al. (NeurIPS 2022) describe it.

CLIP's image and text embeddings live in two separate cones of the unit sphere: an image is far
closer to another image than to its own caption (real CLIP ViT-B/16: about 0.3 to its caption,
0.5–0.8 to an image of the same class), and the two modalities fall in separate regions of a
PCA. DPSeg (Zhao et al., CVPR 2025) is built on that gap: a visual prompt, being an image, sits on
the image's side of it. :func:`modality_gap` summarises it from embeddings a caller computed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.data.toyworld import TRAIN_SEED_LIMIT, ToyWorld

if TYPE_CHECKING:
    from ovseg.backbones.clip import ClipBackbone

# Single-class images drawn from seeds no training run uses.
HELD_OUT_SEED = TRAIN_SEED_LIMIT + 7_000_000


@dataclass(frozen=True)
class ModalityGap:
    """Summary of the gap over a set of single-class images (cosines are means).

    Attributes:
        image_caption: image against a caption of its own class.
        image_image_same: image against another image of the same class.
        image_image_other: image against images of other classes.
        caption_caption_other: captions of different classes.
        centroid_distance: ``‖mean(image) − mean(caption)‖`` of the normalised embeddings, Liang
            et al.'s gap vector's length (0: no gap; real CLIP: about 0.8).
        pca_separation: fraction of embeddings on their own modality's side of the midpoint
            between the two modalities' centroids, along the first principal component of all of
            them (1.0: the PCA shows two separate regions; 0.5: mixed).
    """

    image_caption: float
    image_image_same: float
    image_image_other: float
    caption_caption_other: float
    centroid_distance: float
    pca_separation: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def modality_gap(images: Tensor, captions: Tensor, labels: Tensor) -> ModalityGap:
    """The gap between ``N×D`` image embeddings and ``N×D`` embeddings of their captions.

    Arguments:
        images: image embeddings (normalised here).
        captions: one caption embedding per image, naming the image's class.
        labels: ``N`` class ids; at least two images of some class for ``image_image_same``.
    """
    if images.shape != captions.shape or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"images {tuple(images.shape)}, captions {tuple(captions.shape)} and labels "
            f"{tuple(labels.shape)} must describe the same N images"
        )
    images = F.normalize(images.float(), dim=-1)
    captions = F.normalize(captions.float(), dim=-1)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    if not (same & off_diagonal).any():
        raise ValueError("image_image_same needs at least two images of one class")
    image_image = images @ images.T
    caption_caption = captions @ captions.T

    both = torch.cat([images, captions])
    centred = both - both.mean(dim=0)
    first_component = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    projected = both @ first_component
    image_side = projected[: len(images)]
    caption_side = projected[len(images) :]
    midpoint = (image_side.mean() + caption_side.mean()) / 2
    sign = 1.0 if image_side.mean() > caption_side.mean() else -1.0
    on_own_side = torch.cat(
        [sign * (image_side - midpoint) > 0, sign * (caption_side - midpoint) < 0]
    )
    return ModalityGap(
        image_caption=(images * captions).sum(dim=-1).mean().item(),
        image_image_same=image_image[same & off_diagonal].mean().item(),
        image_image_other=image_image[~same].mean().item(),
        caption_caption_other=caption_caption[~same].mean().item(),
        centroid_distance=(images.mean(dim=0) - captions.mean(dim=0)).norm().item(),
        pca_separation=on_own_side.float().mean().item(),
    )


@dataclass(frozen=True)
class ClipEvaluation:
    """A toy CLIP judged on held-out single-class images.

    Attributes:
        metrics: zero-shot top-1 in percent (all, seen and unseen classes) and the gap
            (``gap_*``, see :class:`ModalityGap`), with the evaluation's settings.
        images: ``N×D`` normalised image embeddings.
        captions: ``N×D`` normalised embeddings of one caption per image.
        labels: ``N`` class ids.
    """

    metrics: dict
    images: Tensor
    captions: Tensor
    labels: Tensor


@torch.no_grad()
def evaluate_clip(
    backbone: ClipBackbone,
    world: ToyWorld,
    *,
    images_per_class: int,
    image_size: int,
    templates: str = "imagenet",
) -> ClipEvaluation:
    """Zero-shot top-1 over every ToyWorld class, and the modality gap, on
    ``images_per_class`` held-out images of each class (``ToyWorld.sprite_image``) with one
    varied caption each (``ToyWorld.single_caption``)."""
    backbone.eval()
    device = next(backbone.model.parameters()).device
    text = backbone.encode_text([(c.name, *c.synonyms) for c in world.classes], templates).mean
    text = text.float().cpu()
    labels = torch.arange(len(world.classes)).repeat_interleave(images_per_class)
    pixels = torch.from_numpy(
        np.stack(
            [
                world.sprite_image(class_id, HELD_OUT_SEED + repeat, size=image_size)
                for class_id in range(len(world.classes))
                for repeat in range(images_per_class)
            ]
        )
    )
    pixels = pixels.permute(0, 3, 1, 2).float() / 255.0
    images = torch.cat(
        [
            backbone.encode_image(backbone.normalize(chunk.to(device))).global_embedding.float()
            for chunk in pixels.split(256)
        ]
    ).cpu()
    images = F.normalize(images, dim=-1)
    correct = (images @ text.T).argmax(dim=1) == labels
    seen = torch.tensor([world.classes[i].seen for i in labels.tolist()])
    rng = np.random.default_rng(HELD_OUT_SEED)
    captions = backbone.encode_prompts([world.single_caption(i, rng) for i in labels.tolist()])
    captions = captions.float().cpu()
    gap = modality_gap(images, captions, labels)
    metrics = {
        "zero_shot_top1_all": correct.float().mean().item() * 100,
        "zero_shot_top1_seen": correct[seen].float().mean().item() * 100,
        "zero_shot_top1_unseen": correct[~seen].float().mean().item() * 100,
        "num_classes": len(world.classes),
        "images_per_class": images_per_class,
        "eval_image_size": image_size,
        "eval_templates": templates,
        **{f"gap_{name}": value for name, value in gap.as_dict().items()},
    }
    return ClipEvaluation(metrics, images, captions, labels)
