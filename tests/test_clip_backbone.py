import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ovseg.backbones import PAPER_CLIPS, WeightsError, load_backbone, load_clip
from ovseg.prompts.templates import resolve_templates


def test_toy_vit_dense_features_have_the_documented_shapes(toy_vit):
    images = torch.rand(2, 3, 128, 96)
    with torch.no_grad():
        features = toy_vit.encode_image(
            toy_vit.normalize(images), layers=[1, -1], return_attention=True
        )
    assert features.dense.shape == (2, 128, 16, 12)
    assert features.global_embedding.shape == (2, 128)
    assert set(features.intermediates) == {"layer1", "layer5"}
    assert features.intermediates["layer1"].shape == (2, 192, 16, 12)
    assert features.attention.shape == (2, 192, 192)
    # patch-to-patch rows leave out the class token, so they sum to less than one
    row_sums = features.attention.sum(-1)
    assert (row_sums <= 1 + 1e-5).all() and (row_sums > 0).all()
    assert features.stride == 8 and features.input_size == (128, 96)


def test_vit_global_embedding_at_native_size_equals_open_clip(toy_vit):
    size = toy_vit.image_size
    images = toy_vit.normalize(torch.rand(2, 3, size, size))
    with torch.no_grad():
        ours = toy_vit.encode_image(images).global_embedding
        reference = toy_vit.model.encode_image(images)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_maskclip_changes_dense_features_but_not_the_global_embedding(toy_vit):
    images = toy_vit.normalize(torch.rand(1, 3, 64, 64))
    with torch.no_grad():
        standard = toy_vit.encode_image(images)
        maskclip = toy_vit.encode_image(images, dense_mode="maskclip")
    torch.testing.assert_close(standard.global_embedding, maskclip.global_embedding)
    assert not torch.allclose(standard.dense, maskclip.dense)
    with pytest.raises(ValueError, match="dense_mode"):
        toy_vit.encode_image(images, dense_mode="sclip")


def test_toy_convnext_gives_four_stages_and_per_pixel_clip_embeddings(toy_convnext):
    images = toy_convnext.normalize(torch.rand(1, 3, 128, 128))
    with torch.no_grad():
        features = toy_convnext.encode_image(images, layers=[0, 1, 2, 3])
        reference = toy_convnext.model.encode_image(images)
    shapes = {name: tuple(t.shape) for name, t in features.intermediates.items()}
    assert shapes == {
        "stride4": (1, 40, 32, 32),
        "stride8": (1, 80, 16, 16),
        "stride16": (1, 160, 8, 8),
        "stride32": (1, 320, 4, 4),
    }
    assert features.dense.shape == (1, 128, 4, 4)
    torch.testing.assert_close(features.global_embedding, reference)
    with pytest.raises(ValueError, match="only for ViT"):
        toy_convnext.encode_image(images, return_attention=True)


def test_inputs_that_do_not_fit_the_stride_are_refused(toy_vit):
    with pytest.raises(ValueError, match="multiple of the stride 8"):
        toy_vit.encode_image(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match="B×3×H×W"):
        toy_vit.encode_image(torch.rand(3, 64, 64))


def test_text_embeddings_average_synonyms_per_template(toy_vit):
    with torch.no_grad():
        text = toy_vit.encode_text([("car", "automobile"), "sky"], ["a photo of a {}.", "a {}."])
        car = toy_vit.encode_prompts(["a photo of a car.", "a car."])
        automobile = toy_vit.encode_prompts(["a photo of a automobile.", "a automobile."])
    assert text.per_template.shape == (2, 2, 128) and text.mean.shape == (2, 128)
    torch.testing.assert_close(text.per_template[0], F.normalize(car + automobile, dim=-1))
    torch.testing.assert_close(text.mean[0], F.normalize(text.per_template[0].mean(0), dim=-1))
    torch.testing.assert_close(text.per_template.norm(dim=-1), torch.ones(2, 2))


def test_text_cache_hits_for_the_same_request_and_misses_for_a_new_vocabulary(toy_vit):
    toy_vit.clear_text_cache()
    with torch.no_grad():
        first = toy_vit.encode_text(["cat", "dog"], "short")
        again = toy_vit.encode_text(["cat", "dog"], "short")
        other_vocabulary = toy_vit.encode_text(["cat", "bird"], "short")
        other_templates = toy_vit.encode_text(["cat", "dog"], "single")
    assert again is first
    assert other_vocabulary is not first
    torch.testing.assert_close(other_vocabulary.per_template[0], first.per_template[0])
    assert not torch.allclose(other_vocabulary.per_template[1], first.per_template[1])
    assert other_templates.per_template.shape == (2, 1, 128)


def test_text_cache_misses_after_the_text_weights_change():
    backbone = load_backbone("toy-vit", "random")
    with torch.no_grad():
        before = backbone.encode_text(["cat"], "single")
        backbone.model.text_projection.mul_(-1.0)
        after = backbone.encode_text(["cat"], "single")
    assert after is not before
    torch.testing.assert_close(after.mean, -before.mean)


def test_a_mixed_precision_text_encoding_never_answers_a_float32_call():
    backbone = load_backbone("toy-vit", "random")
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = backbone.encode_text(["cat", "dog"], "single")
        full = backbone.encode_text(["cat", "dog"], "single")
        reference = load_backbone("toy-vit", "random")
        reference.load_state_dict(backbone.state_dict())
        expected = reference.encode_text(["cat", "dog"], "single")
    assert full is not mixed
    assert full.mean.dtype == torch.float32
    assert torch.equal(full.mean, expected.mean)


def test_text_embeddings_carry_gradients_when_the_text_tower_trains(toy_vit):
    text = toy_vit.encode_text(["cat"], "single")
    assert text.mean.requires_grad
    with torch.no_grad():
        assert not toy_vit.encode_text(["cat"], "single").mean.requires_grad


def test_every_paper_clip_is_a_known_open_clip_name_and_tag():
    known = set(open_clip.list_pretrained())
    for name, tag in PAPER_CLIPS.values():
        assert (name, tag) in known


@pytest.mark.parametrize(
    ("name", "size", "embed_dim", "grid", "layer_dims"),
    [
        ("ViT-B-16", 384, 512, 24, [768] * 12),
        ("convnext_base_w_320", 320, 640, 10, [128, 256, 512, 1024]),
    ],
)
def test_real_architectures_build_with_random_weights(name, size, embed_dim, grid, layer_dims):
    backbone = load_clip(name)
    assert backbone.embed_dim == embed_dim and backbone.layer_dims == layer_dims
    with torch.no_grad():
        features = backbone.encode_image(torch.zeros(1, 3, size, size), layers=[0])
    assert features.dense.shape == (1, embed_dim, grid, grid)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "embed_dim", "layer_dims"),
    [
        ("ViT-L-14", 768, [1024] * 24),
        ("convnext_large_d_320", 768, [192, 384, 768, 1536]),
    ],
)
def test_large_paper_architectures_build(name, embed_dim, layer_dims):
    backbone = load_clip(name)
    assert backbone.embed_dim == embed_dim and backbone.layer_dims == layer_dims


def test_an_alias_with_a_local_checkpoint_keeps_the_checkpoint():
    from ovseg.backbones.clip import resolve_clip_name

    assert resolve_clip_name("vit-b-16", "/models/ViT-B-16.pt") == (
        "ViT-B-16",
        "/models/ViT-B-16.pt",
    )
    assert resolve_clip_name("convnext-l", None) == (
        "convnext_large_d_320",
        "laion2b_s29b_b131k_ft_soup",
    )
    assert resolve_clip_name("ViT-B-16", None) == ("ViT-B-16", None)


def test_aliases_resolve_to_the_papers_clips():
    assert PAPER_CLIPS["convnext-b"] == ("convnext_base_w_320", "laion_aesthetic_s13b_b82k")
    assert PAPER_CLIPS["vit-b-16"] == ("ViT-B-16", "openai")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_local_checkpoint_round_trips(tmp_path, toy_vit, suffix):
    path = tmp_path / f"toy{suffix}"
    state = {k: v.contiguous() for k, v in toy_vit.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    loaded = load_backbone("toy-vit", str(path))
    images = toy_vit.normalize(torch.rand(1, 3, 64, 64))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_image(images).dense, toy_vit.encode_image(images).dense
        )


def test_a_local_open_clip_folder_loads_through_local_dir(tmp_path, toy_vit):
    config = open_clip.get_model_config("ovseg-toy-vit")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    save_file(
        {k: v.contiguous() for k, v in toy_vit.model.state_dict().items()},
        tmp_path / "open_clip_model.safetensors",
    )
    loaded = load_clip(f"local-dir:{tmp_path}")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_text(["cat"], "single").mean, toy_vit.encode_text(["cat"], "single").mean
        )


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_corrupt_weights_file_is_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="Could not load CLIP"):
        load_backbone("toy-vit", str(path))


def test_a_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone("toy-vit", str(tmp_path / "nowhere.pt"))


def test_hub_weights_unreachable_offline_are_a_clear_error():
    with pytest.raises(WeightsError, match="Without network access"):
        load_clip("ViT-B-16", "openai")
    with pytest.raises(WeightsError, match="Without network access"):
        load_clip("hf-hub:laion/CLIP-convnext_base_w_320-laion_aesthetic-s13B-b82K")


def test_a_new_vocabulary_encodes_only_the_classes_not_seen_before(toy_vit, monkeypatch):
    toy_vit.clear_text_cache()
    encoded: list[str] = []
    original = toy_vit.encode_prompts

    def counting(prompts):
        encoded.extend(prompts)
        return original(prompts)

    monkeypatch.setattr(toy_vit, "encode_prompts", counting)
    with torch.no_grad():
        toy_vit.encode_text(["cat", ("car", "automobile")], "short")
        encoded.clear()
        mixed = toy_vit.encode_text([("car", "automobile"), "bird", "cat"], "short")
    assert encoded == [template.format("bird") for template in resolve_templates("short")]
    toy_vit.clear_text_cache()
    with torch.no_grad():
        fresh = toy_vit.encode_text([("car", "automobile"), "bird", "cat"], "short")
    torch.testing.assert_close(mixed.per_template, fresh.per_template, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed.mean, fresh.mean, atol=1e-6, rtol=1e-5)


def test_the_per_class_text_cache_stays_within_its_bound(toy_vit, monkeypatch):
    toy_vit.clear_text_cache()
    per_class = len(resolve_templates("short")) * 128
    monkeypatch.setattr(toy_vit._class_cache, "max_size", 3 * per_class)
    with torch.no_grad():
        for names in (["cat", "dog"], ["bird", "fish"], ["cow", "pig"]):
            toy_vit.encode_text(names, "short")
    assert len(toy_vit._class_cache) == 3
    assert toy_vit._class_cache.total_size == 3 * per_class
    toy_vit.clear_text_cache()
