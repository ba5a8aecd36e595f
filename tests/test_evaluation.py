"""The shared evaluation: whole-image and sliding-window inference for every method, and the
seen-class calibration that zero-shot evaluation must hand to LDVC."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_datasets import write_fake_dataset

import ovseg
from ovseg.data.datasets import SegmentationDataset, zero_shot_split
from ovseg.data.toyworld import ToyWorld
from ovseg.errors import OptionError
from ovseg.eval.evaluate import (
    SlideWindow,
    evaluate_toyworld,
    paper_window,
    predict_logits,
    resize_short_side,
    slide_logits,
    window_starts,
)
from ovseg.methods.base import MethodConfig, SegmentationMethod, SegmentationOutput
from ovseg.methods.ldvc import Ldvc, build_ldvc
from ovseg.methods.weights import save_weights

LDVC_TINY = {"input_size": 64, "visual_prompt_tokens": 4, "top_m": 2, "heads": 4}


class CropMean(SegmentationMethod):
    """A stand-in method whose logits are, over each whole input, its mean red value (one
    class) and its width (another): what each window contributed can be told apart."""

    name = "crop-mean"

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.config = MethodConfig(input_size=input_size)
        self.inputs: list[tuple[int, ...]] = []

    def forward(self, images, vocabulary, **options):
        self.inputs.append(tuple(images.shape))
        mean = images[:, 0].mean(dim=(1, 2))[:, None, None, None]
        width = torch.full_like(mean, images.shape[-1])
        logits = torch.cat([mean, width], dim=1).expand(-1, -1, *images.shape[-2:])
        return SegmentationOutput(logits=logits)


def ramp(height: int, width: int) -> torch.Tensor:
    """``1×3×H×W`` image whose red channel is the column index."""
    red = torch.arange(width, dtype=torch.float).expand(height, width)
    return torch.stack([red, torch.zeros_like(red), torch.zeros_like(red)])[None]


# ---------------------------------------------------------------------------- windows


def test_windows_start_every_stride_and_the_last_ends_at_the_edge():
    assert window_starts(96, 64, 48) == [0, 32]
    assert window_starts(200, 64, 48) == [0, 48, 96, 136]
    assert window_starts(64, 64, 48) == [0]
    assert window_starts(40, 64, 48) == [0]  # shorter than a crop: one padded window
    # LDVC's paper setting: ZegCLIP's test_cfg at 512, and a 512×683 VOC image.
    assert SlideWindow.zegclip(512) == SlideWindow(512, 512, 426, max_long_side=2048)
    assert window_starts(683, 512, 426) == [0, 171]
    with pytest.raises(OptionError, match="stride"):
        SlideWindow(short_side=64, crop=64, stride=65)


def test_the_short_side_is_resized_and_the_long_side_capped():
    assert resize_short_side(torch.zeros(1, 3, 50, 100), 64).shape[-2:] == (64, 128)
    assert resize_short_side(torch.zeros(1, 3, 100, 75), 64).shape[-2:] == (85, 64)
    capped = resize_short_side(torch.zeros(1, 3, 10, 100), 64, max_long_side=320)
    assert capped.shape[-2:] == (32, 320)


def test_overlapping_windows_average_their_logits():
    method = CropMean(input_size=64)
    image = ramp(64, 96)
    logits = slide_logits(method, image, ["red", "width"], SlideWindow(64, 64, 48))
    assert method.inputs == [(2, 3, 64, 64)]  # both windows in one batch, at the input size
    left, right = 31.5, 63.5  # mean column of the windows at 0 and 32
    expected = torch.full((64, 96), left)
    expected[:, 32:64] = (left + right) / 2
    expected[:, 64:] = right
    torch.testing.assert_close(logits[0, 0], expected)
    torch.testing.assert_close(logits[0, 1], torch.full((64, 96), 64.0))


def test_windows_are_resized_to_the_input_size_and_a_short_image_is_padded():
    method = CropMean(input_size=32)
    logits = slide_logits(method, ramp(64, 96), ["red", "width"], SlideWindow(64, 64, 48))
    assert method.inputs == [(2, 3, 32, 32)]
    # The method saw 32 columns; its logits were resized back to the 64-pixel window.
    torch.testing.assert_close(logits[0, 1], torch.full((64, 96), 32.0))
    method = CropMean(input_size=64)
    window = SlideWindow(short_side=32, crop=64, stride=48)
    logits = slide_logits(method, ramp(32, 48), ["red", "width"], window)
    assert logits.shape == (1, 2, 32, 48) and method.inputs == [(1, 3, 64, 64)]
    # Zero padding on the right and bottom: 48 of the 64×64 window's columns hold the ramp.
    assert logits[0, 0, 0, 0].item() == pytest.approx(sum(range(48)) / 64 / 2)


def test_one_window_covering_the_image_equals_whole_image_inference(dense_clip):
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    vocabulary = ["cat", "dog", "sky"]
    window = SlideWindow(short_side=128, crop=128, stride=96)
    with torch.no_grad():
        whole = dense_clip(image, vocabulary).logits
        slid = slide_logits(dense_clip, image, vocabulary, window)
        torch.testing.assert_close(slid, whole)
        # A square scene larger than the input: both protocols resize it to one window.
        scene = F.interpolate(image, size=(256, 256), mode="bilinear")
        torch.testing.assert_close(
            predict_logits(dense_clip, scene, vocabulary, window=window),
            predict_logits(dense_clip, scene, vocabulary),
        )


def test_a_non_square_image_slides_and_comes_back_at_its_own_size(dense_clip):
    image = torch.rand(1, 3, 50, 90, generator=torch.Generator().manual_seed(1))
    vocabulary = ["cat", "dog"]
    window = SlideWindow(short_side=128, crop=128, stride=96)
    with torch.no_grad():
        logits = predict_logits(dense_clip, image, vocabulary, window=window)
        slid = slide_logits(dense_clip, image, vocabulary, window)
        resized = resize_short_side(image, 128)
        first = dense_clip(resized[..., :128], vocabulary).logits
    assert logits.shape == (1, 2, 50, 90)
    back = F.interpolate(slid, size=(50, 90), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, back)
    assert resized.shape[-2:] == (128, 230) and slid.shape[-2:] == (128, 230)
    # Columns 0..95 lie only in the first window (the next starts at 96).
    # (batched windows against one image: the same math, other kernels, so float32 noise)
    torch.testing.assert_close(slid[..., :96], first[..., :96], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(slid[..., 96:128], first[..., 96:128])


@pytest.mark.parametrize("name", ["dense-clip", "dpseg", "dcp-clip", "esc-net", "ldvc"])
def test_every_method_runs_through_sliding_windows(name):
    method = ovseg.load(name)
    size = method.config.input_size
    window = SlideWindow(short_side=size, crop=size, stride=size * 3 // 4)
    image = torch.rand(1, 3, 40, 60, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = predict_logits(method, image, ["cat", "grass", "sky"], window=window)
    assert logits.shape == (1, 3, 40, 60) and torch.isfinite(logits).all()


def test_ldvc_evaluates_with_zegclips_sliding_windows_and_the_others_whole(dense_clip):
    assert paper_window(dense_clip) is None
    method = build_ldvc(backbone="toy-vit", pretrained="random", **LDVC_TINY)
    assert paper_window(method) == SlideWindow(64, 64, 53, max_long_side=256)


# ------------------------------------------------------------------ seen-class calibration


@pytest.fixture
def recorded_ldvc_options(monkeypatch):
    """The options every LDVC segment() call receives."""
    calls: list[dict] = []
    original = Ldvc.segment

    def segment(self, features, vocabulary, **options):
        calls.append(options)
        return original(self, features, vocabulary, **options)

    monkeypatch.setattr(Ldvc, "segment", segment)
    return calls


def test_zero_shot_benchmarks_apply_the_configs_seen_probability_offset(
    tmp_path, recorded_ldvc_options
):
    from training.evaluate import main

    torch.manual_seed(0)
    settings = {"backbone": "toy-vit", "pretrained": "random", **LDVC_TINY}
    method = build_ldvc(**settings, seen_prob_offset=0.1)
    weights = save_weights(method, tmp_path / "ldvc")
    config = tmp_path / "ldvc-tiny.json"
    config.write_text(json.dumps({"method": "ldvc", "method_config": settings}))
    root = tmp_path / "datasets"
    write_fake_dataset(root, "pascal-voc-20", layout="mmseg", split="val", count=1)
    vocabulary = SegmentationDataset("pascal-voc-20", root=root, layout="mmseg").vocabulary
    seen_names = [vocabulary[i][0] for i in zero_shot_split("pascal-voc-20")[0]]

    arguments = ["--config", str(config), "--weights", str(weights), "--zero-shot",
                 "pascal-voc-20", "--datasets-root", str(root)]  # fmt: skip
    rows = main(arguments)
    assert rows[0]["inference"] == "slide 64/64/53"
    assert len(recorded_ldvc_options) == 1  # both windows of the 64×85 image in one call
    assert len(seen_names) == 15 and recorded_ldvc_options[0]["seen_classes"] == seen_names
    # The option overrides the config: 0 turns the calibration off.
    recorded_ldvc_options.clear()
    main([*arguments, "--option", "seen_prob_offset=0"])
    assert all("seen_classes" not in options for options in recorded_ldvc_options)


def test_toy_sets_with_unseen_classes_apply_the_configs_seen_probability_offset(
    recorded_ldvc_options,
):
    torch.manual_seed(0)
    method = build_ldvc(backbone="toy-vit", pretrained="random", **LDVC_TINY, seen_prob_offset=0.1)
    method.trained_head = True
    evaluate_toyworld(method, "toy-open", num_images=1)
    evaluate_toyworld(method, "toy-seen", num_images=1)
    open_call, seen_call = recorded_ldvc_options
    world = ToyWorld()
    seen_names = {world.classes[i].name for i in world.seen_class_ids}
    assert open_call["seen_classes"] and set(open_call["seen_classes"]) <= seen_names
    assert "seen_classes" not in seen_call


class Oracle(SegmentationMethod):
    """Predicts the ground truth of the scenes it is given (looked up by their pixels)."""

    name = "oracle"

    def __init__(self, scenes) -> None:
        super().__init__()
        self.config = MethodConfig(input_size=64)
        self.answers = {s.image.tobytes(): torch.from_numpy(s.labels) for s in scenes}
        self.unused = torch.nn.Linear(1, 1)  # evaluation reads the device from a parameter

    def forward(self, images, vocabulary, **options):
        pixels = (images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        labels = torch.stack([self.answers[p.tobytes()] for p in pixels])
        one_hot = F.one_hot(labels, len(vocabulary)).permute(0, 3, 1, 2)
        return SegmentationOutput(logits=one_hot.float())


def test_every_toyworld_class_is_scored_even_the_one_whose_id_is_the_ignore_index():
    """ToyWorld has 312 classes, so class 255 (sunglasses) shares its id with IGNORE_INDEX: over
    the whole vocabulary its pixels must still count."""
    from ovseg.data.toyworld import eval_set

    scenes = eval_set("toy-full", image_size=64, num_images=40)
    assert any((s.labels == 255).any() for s in scenes)  # sunglasses are in these scenes
    method = Oracle(scenes)
    result = evaluate_toyworld(method, "toy-full", num_images=40, image_size=64, batch_size=8)
    assert result.scores.pixel_accuracy == pytest.approx(100.0)
    assert result.scores.per_class_iou[255] == pytest.approx(100.0)
