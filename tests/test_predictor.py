import numpy as np
import pytest
import torch

import ovseg
from ovseg.methods import SegmentationOutput, build_method, list_methods


def _scene(rng, height=150, width=200):
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_dense_clip_is_registered_and_unknown_methods_are_named():
    assert "dense-clip" in list_methods()
    with pytest.raises(ValueError, match=r"available: .*dense-clip"):
        build_method("mask-rcnn")


def test_dense_clip_forward_returns_logits_at_input_size(dense_clip):
    with torch.no_grad():
        output = dense_clip(torch.rand(2, 3, 64, 96), ["cat", "dog", ("car", "automobile")])
    assert isinstance(output, SegmentationOutput)
    assert output.logits.shape == (2, 3, 64, 96)
    assert output.intermediates == {}


def test_dense_clip_logits_are_the_scaled_cost_volume(dense_clip):
    with torch.no_grad():
        output = dense_clip(torch.rand(1, 3, 64, 64), ["cat", "dog"], return_intermediates=True)
    cost = output.intermediates["cost_volume"]
    assert cost.shape == (1, 2, 8, 8)
    expected = torch.nn.functional.interpolate(
        cost / dense_clip.config.temperature, size=(64, 64), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(output.logits, expected)


def test_dense_clip_refuses_unknown_options(dense_clip):
    with pytest.raises(ValueError, match="takes no options"):
        dense_clip(torch.rand(1, 3, 64, 64), ["cat"], theta=0.3)


def test_predict_before_set_image_is_a_clear_error(dense_clip):
    with pytest.raises(RuntimeError, match="set_image"):
        ovseg.Predictor(dense_clip).predict("cat")


def test_prediction_has_a_label_map_at_image_size_with_areas_and_timings(dense_clip, rng):
    predictor = ovseg.Predictor(dense_clip)
    predictor.set_image(_scene(rng))
    prediction = predictor.predict("cat, dog; puppy, sky", return_intermediates=True)["dense-clip"]
    assert prediction.label_map.shape == (150, 200)
    assert prediction.label_map.max() < 3
    assert prediction.areas.sum() == pytest.approx(1.0)
    assert prediction.scores.shape == (3,)
    assert set(prediction.timings) == {"encode_image", "segment", "postprocess"}
    assert "cost_volume" in prediction.intermediates
    summary = prediction.summary()
    assert summary["vocabulary"] == ["cat", "dog", "sky"]
    assert sum(c["area"] for c in summary["classes"]) == pytest.approx(1.0, abs=1e-4)


def test_a_new_vocabulary_does_not_re_encode_the_image(dense_clip, rng, monkeypatch):
    predictor = ovseg.Predictor(dense_clip)
    predictor.set_image(_scene(rng))
    calls = []
    original = dense_clip.encode_image
    monkeypatch.setattr(
        dense_clip, "encode_image", lambda images: calls.append(1) or original(images)
    )
    first = predictor.predict("cat, dog")["dense-clip"]
    second = predictor.predict("car, tree, grass")["dense-clip"]
    assert len(calls) == 1
    assert first.timings["encode_image"] > 0 and second.timings["encode_image"] == 0
    predictor.set_image(_scene(rng))
    predictor.predict("cat")
    assert len(calls) == 2


def test_the_label_map_matches_upsampling_the_logits_then_argmax(dense_clip, rng):
    predictor = ovseg.Predictor(dense_clip)
    image = predictor.set_image(_scene(rng, 97, 131))
    prediction = predictor.predict("cat, dog, sky, grass")["dense-clip"]
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    pixels = torch.nn.functional.interpolate(
        pixels, size=(128, 128), mode="bilinear", antialias=True
    )
    with torch.no_grad():
        logits = dense_clip(pixels, ["cat", "dog", "sky", "grass"]).logits
    reference = torch.nn.functional.interpolate(logits, size=(97, 131), mode="bilinear")[0].argmax(
        0
    )
    assert (torch.from_numpy(prediction.label_map) == reference).float().mean() > 0.995


def test_a_vocabulary_of_a_thousand_names_works(toy_vit, rng):
    # One template keeps this a test of correctness; benchmarks/ measures the 80-template cost.
    method = ovseg.load("dense-clip", backbone=toy_vit, templates="single", input_size=64)
    predictor = ovseg.Predictor(method)
    predictor.set_image(_scene(rng, 64, 64))
    vocabulary = [f"object number {i}" for i in range(1000)]
    prediction = predictor.predict(vocabulary)["dense-clip"]
    assert prediction.scores.shape == (1000,)
    assert prediction.label_map.max() < 1000


def test_bad_inputs_are_clear_errors_and_keep_the_image(dense_clip, rng):
    predictor = ovseg.Predictor(dense_clip)
    predictor.set_image(_scene(rng))
    with pytest.raises(ovseg.VocabularyError, match="empty"):
        predictor.predict(" , ;")
    with pytest.raises(ovseg.ImageError):
        predictor.set_image(np.zeros((1, 1, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="Unknown method"):
        predictor.predict("cat", methods=["ldvc-typo"])
    # the earlier image is still there and still usable
    assert predictor.predict("cat, dog")["dense-clip"].label_map.shape == (150, 200)


def test_duplicate_names_are_dropped_and_reported(dense_clip, rng):
    predictor = ovseg.Predictor(dense_clip)
    predictor.set_image(_scene(rng, 64, 64))
    prediction = predictor.predict("cat, cat, dog")["dense-clip"]
    assert prediction.vocabulary.names == ("cat", "dog")
    assert prediction.vocabulary.dropped_duplicates == ("cat",)


@pytest.mark.parametrize("name", ["dense-clip", "dpseg", "dcp-clip", "esc-net", "ldvc"])
def test_cached_vocabularies_give_the_same_logits_as_fresh_encodings(name, rng):
    """The text caches (whole vocabularies, single classes, DPSeg's visual prompts) are an
    optimisation only: an edited vocabulary served partly from them equals a cold encoding."""
    method = ovseg.load(name)
    predictor = ovseg.Predictor(method)
    predictor.set_image(_scene(rng, 96, 96))
    predictor.predict("cat, dog, grass, sky")
    edited = "dog, car, sky, cat"  # reordered, one class new
    cached = predictor.predict(edited)[name].label_map
    with torch.inference_mode():
        warm = method.segment(predictor.features(name), ["dog", "car", "sky", "cat"]).logits
    method.clear_caches()
    assert not method.backbone._text_cache and not method.backbone._class_cache
    with torch.inference_mode():
        fresh = method.segment(predictor.features(name), ["dog", "car", "sky", "cat"]).logits
    torch.testing.assert_close(warm, fresh, atol=1e-4, rtol=1e-4)
    assert (predictor.predict(edited)[name].label_map == cached).mean() > 0.999


def test_ldvc_encodes_only_the_names_a_vocabulary_edit_added(monkeypatch):
    method = ovseg.load("ldvc")
    seen: list[str] = []
    original = method.text_encoder.forward
    monkeypatch.setattr(
        method.text_encoder,
        "forward",
        lambda names, clip: seen.extend(names) or original(names, clip),
    )
    with torch.inference_mode():
        method.encode_classes(["cat", ("car", "automobile")])
        seen.clear()
        method.encode_classes([("car", "automobile"), "bird", "cat"])
    assert seen == ["bird"]


def test_chunked_mean_probabilities_equal_the_full_softmax():
    from ovseg.predictor import _mean_probabilities

    logits = torch.randn(50, 17, 23) * 20
    reference = logits.softmax(dim=0).mean(dim=(1, 2))
    for floats in (1, 17 * 23 * 7, 2**22):  # one class per chunk, 7 per chunk, all at once
        torch.testing.assert_close(_mean_probabilities(logits, floats), reference)
    half = logits.half()
    torch.testing.assert_close(
        _mean_probabilities(half, 17 * 23 * 3), half.float().softmax(dim=0).mean(dim=(1, 2))
    )


def test_leaving_out_dominated_classes_keeps_every_label():
    from ovseg.predictor import _band_argmax, _possible_winners, _postprocess

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 12, 10, generator=generator)
    logits[:3] += 6  # three strong classes dominate most of the others everywhere
    logits[50] = -1e4  # and one is "not selected", as DCP-CLIP scatters it
    logits[7, 4, 4] = 30  # a weak class that wins one pixel stays a candidate
    candidates = _possible_winners(logits)
    assert 7 in candidates and 50 not in candidates and len(candidates) < 200
    size = (37, 53)
    labels, _, areas = _postprocess(logits, size)
    reference = _band_argmax(logits[None], size, 0, size[0]).numpy()
    assert (labels == reference).all()
    assert areas.sum() == pytest.approx(1.0)
