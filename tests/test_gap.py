"""The modality-gap summary (ovseg.eval.gap) on embeddings whose gap is known by construction."""

import pytest
import torch
import torch.nn.functional as F

from ovseg.eval.gap import modality_gap


def cones(gap: float, classes: int = 20, per_class: int = 3, dim: int = 64, seed: int = 0):
    """Images and captions of ``classes`` classes: each class has a random direction; images add
    ``gap`` × a shared image direction, captions ``gap`` × a shared caption direction."""
    generator = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(classes, dim, generator=generator), dim=-1)
    image_axis, caption_axis = F.normalize(torch.randn(2, dim, generator=generator), dim=-1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    noise = 0.03 * torch.randn(len(labels), dim, generator=generator)
    images = directions[labels] + gap * image_axis + noise
    captions = directions[labels] + gap * caption_axis
    return images, captions, labels


def test_no_gap_when_both_modalities_share_one_region():
    gap = modality_gap(*cones(0.0))
    assert gap.image_caption > 0.9
    assert gap.image_image_same > 0.9
    assert gap.centroid_distance < 0.1
    assert gap.pca_separation < 0.75


def test_a_gap_pulls_images_together_and_away_from_their_captions():
    gap = modality_gap(*cones(1.5))
    assert gap.image_caption < 0.5
    assert gap.image_image_same > gap.image_caption + 0.3
    assert gap.image_image_other > 0.5  # the image cone
    assert gap.caption_caption_other > 0.5  # the caption cone
    assert gap.centroid_distance > 0.8
    assert gap.pca_separation == 1.0


def test_the_summary_only_depends_on_directions():
    images, captions, labels = cones(1.0)
    scaled = modality_gap(3 * images, 0.5 * captions, labels).as_dict()
    assert scaled == pytest.approx(modality_gap(images, captions, labels).as_dict())


def test_shapes_and_same_class_pairs_are_checked():
    images, captions, labels = cones(1.0)
    with pytest.raises(ValueError, match="same N images"):
        modality_gap(images, captions[:-1], labels)
    with pytest.raises(ValueError, match="two images of one class"):
        modality_gap(images[::3], captions[::3], labels[::3])
