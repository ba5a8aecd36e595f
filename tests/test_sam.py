"""SAM backbone: toy and real architectures, batched decoding, checkpoint loading and its errors."""

import json

import numpy as np
import pytest
import segment_anything
import torch
from safetensors.torch import load_file
from segment_anything.modeling import Sam

import ovseg.backbones
from ovseg.backbones import sam as sam_module
from ovseg.backbones.sam import (
    SAM_CONFIGS,
    TOY_SAM_CHECKPOINT,
    SamBackbone,
    SamConfig,
    build_sam,
    load_sam,
    register_sam_config,
)
from ovseg.errors import WeightsError

TOY_GRID = 16
TOY_DIM = 128
TOY_MASK_SIDE = 4 * TOY_GRID


@pytest.fixture(scope="module")
def toy() -> SamBackbone:
    torch.manual_seed(0)
    return build_sam("toy")


@pytest.fixture(scope="module")
def embeddings(toy: SamBackbone) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return toy.encode_image(torch.rand(2, 3, 200, 160))


@pytest.fixture
def points() -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.tensor([[[30.0, 40.0], [100.0, 120.0], [5.0, 250.0]], [[128.0, 128.0]] * 3])
    labels = torch.tensor([[1, 0, 1], [1, 1, -1]])
    return coords, labels


BOXES = torch.tensor([[10.0, 20.0, 120.0, 200.0], [0.0, 0.0, 255.0, 255.0]])


def _toy_sam_output(backbone: SamBackbone, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    coords = torch.tensor([[[64.0, 64.0]], [[200.0, 30.0]]])
    labels = torch.ones(2, 1)
    with torch.no_grad():
        embeddings = backbone.encode_image(images)
        mask_logits, iou = backbone.decode(embeddings, points=(coords, labels), boxes=BOXES)
    return embeddings, mask_logits, iou


def test_toy_config_is_a_small_genuine_sam(toy: SamBackbone) -> None:
    assert isinstance(toy.sam, Sam)
    assert toy.image_encoder is toy.sam.image_encoder
    assert (toy.image_size, toy.embedding_size, toy.prompt_embed_dim) == (256, TOY_GRID, TOY_DIM)
    assert toy.config is SAM_CONFIGS["toy"]
    assert not toy.training
    assert sum(p.numel() for p in toy.parameters()) == 3_809_856


def test_vit_b_matches_segment_anything_parameter_count() -> None:
    ours = sum(p.numel() for p in build_sam("vit_b").parameters())
    theirs = sum(p.numel() for p in segment_anything.build_sam_vit_b(None).parameters())
    assert ours == theirs == 93_735_472


@pytest.mark.parametrize(
    ("name", "reference"),
    [("vit_l", segment_anything.build_sam_vit_l), ("vit_h", segment_anything.build_sam_vit_h)],
)
def test_large_configs_match_segment_anything_tensor_for_tensor(name, reference) -> None:
    # On the meta device the 300M/600M-parameter models cost no memory or init time.
    with torch.device("meta"):
        ours = SamBackbone(config=SAM_CONFIGS[name]).sam.state_dict()
        theirs = reference(None).state_dict()
    assert {key: value.shape for key, value in ours.items()} == {
        key: value.shape for key, value in theirs.items()
    }


def test_preprocess_resizes_longest_side_normalises_and_pads(toy: SamBackbone) -> None:
    images = torch.full((2, 3, 128, 64), 0.5)
    inputs = toy.preprocess(images)
    assert inputs.shape == (2, 3, 256, 256)
    mean = torch.tensor(SAM_CONFIGS["toy"].pixel_mean).view(3, 1, 1)
    std = torch.tensor(SAM_CONFIGS["toy"].pixel_std).view(3, 1, 1)
    content = inputs[:, :, :, :128]
    torch.testing.assert_close(content, ((127.5 - mean) / std).expand_as(content))
    assert torch.all(inputs[:, :, :, 128:] == 0)


def test_preprocess_rejects_images_outside_unit_range(toy: SamBackbone) -> None:
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\], got values in \[0, 255\]"):
        toy.preprocess(torch.linspace(0.0, 255.0, 3 * 32 * 32).view(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"float \(B, 3, H, W\) tensor, got torch.float32"):
        toy.preprocess(torch.rand(3, 32, 32))


def test_postprocess_masks_returns_original_resolution(toy: SamBackbone) -> None:
    mask_logits = torch.randn(2, 3, TOY_MASK_SIDE, TOY_MASK_SIDE)
    assert toy.postprocess_masks(mask_logits, original_size=(200, 160)).shape == (2, 3, 200, 160)


def test_encode_image_gives_one_embedding_grid_per_image(embeddings: torch.Tensor) -> None:
    assert embeddings.shape == (2, TOY_DIM, TOY_GRID, TOY_GRID)


@pytest.mark.parametrize("multimask_output", [False, True])
@pytest.mark.parametrize(
    "prompts",
    ["points", "boxes", "masks", "points+boxes", "points+masks", "points+boxes+masks", "none"],
)
def test_decode_shapes_for_every_prompt_combination(
    toy, embeddings, points, prompts, multimask_output
) -> None:
    kwargs = {
        "points": points if "points" in prompts else None,
        "boxes": BOXES if "boxes" in prompts else None,
        "masks": torch.randn(2, 1, TOY_MASK_SIDE, TOY_MASK_SIDE) if "masks" in prompts else None,
    }
    with torch.no_grad():
        mask_logits, iou = toy.decode(embeddings, multimask_output=multimask_output, **kwargs)
    outputs = 3 if multimask_output else 1
    assert mask_logits.shape == (2, outputs, TOY_MASK_SIDE, TOY_MASK_SIDE)
    assert iou.shape == (2, outputs)


def test_batched_decode_equals_segment_anything_per_image_calls(toy, embeddings, points) -> None:
    masks = torch.randn(2, 1, TOY_MASK_SIDE, TOY_MASK_SIDE)
    with torch.no_grad():
        mask_logits, iou = toy.decode(
            embeddings, points=points, boxes=BOXES, masks=masks, multimask_output=True
        )
        for i in range(2):
            sparse, dense = toy.prompt_encoder(
                points=(points[0][i : i + 1], points[1][i : i + 1]),
                boxes=BOXES[i : i + 1],
                masks=masks[i : i + 1],
            )
            expected_logits, expected_iou = toy.mask_decoder(
                image_embeddings=embeddings[i : i + 1],
                image_pe=toy.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            torch.testing.assert_close(mask_logits[i : i + 1], expected_logits)
            torch.testing.assert_close(iou[i : i + 1], expected_iou)


def test_decode_shares_one_image_across_prompt_rows(toy, embeddings) -> None:
    coords = torch.tensor([[[20.0, 20.0]], [[200.0, 200.0]], [[128.0, 64.0]]])
    with torch.no_grad():
        shared, _ = toy.decode(embeddings[:1], points=(coords, torch.ones(3, 1)))
        repeated, _ = toy.decode(
            embeddings[:1].expand(3, -1, -1, -1), points=(coords, torch.ones(3, 1))
        )
    assert shared.shape == (3, 1, TOY_MASK_SIDE, TOY_MASK_SIDE)
    torch.testing.assert_close(shared, repeated)


def test_decode_in_bfloat16_follows_the_module_dtype(toy) -> None:
    half = SamBackbone(config=toy.config, name="toy").to(torch.bfloat16)
    half.load_state_dict(toy.state_dict())
    with torch.no_grad():
        embeddings = half.encode_image(torch.rand(1, 3, 64, 64))
        mask_logits, iou = half.decode(
            embeddings, points=(torch.tensor([[[32.0, 32.0]]]), torch.ones(1, 1))
        )
    assert embeddings.dtype == mask_logits.dtype == iou.dtype == torch.bfloat16


def test_decode_rejects_malformed_inputs(toy, embeddings, points) -> None:
    with pytest.raises(
        ValueError, match=r"image_embeddings must be \(B, 128, 16, 16\), got \(2, 256, 64, 64\)"
    ):
        toy.decode(torch.zeros(2, 256, 64, 64), points=points)
    with pytest.raises(ValueError, match=r"point labels must be \(P, N\) = \(2, 3\), got \(2, 2\)"):
        toy.decode(embeddings, points=(points[0], points[1][:, :2]))
    with pytest.raises(
        ValueError, match=r"masks must be \(P, 1, 64, 64\) logits, got \(2, 1, 32, 32\)"
    ):
        toy.decode(embeddings, masks=torch.zeros(2, 1, 32, 32))
    with pytest.raises(
        ValueError, match=r"prompts disagree on the number of rows: \{'points': 2, 'boxes': 1\}"
    ):
        toy.decode(embeddings, points=points, boxes=BOXES[:1])
    with pytest.raises(ValueError, match="2 image embeddings but 3 prompt rows"):
        toy.decode(embeddings, boxes=torch.zeros(3, 4))


def test_safetensors_round_trip_reproduces_outputs(toy, tmp_path) -> None:
    weights_path = toy.save(tmp_path / "toy_sam")
    assert weights_path == tmp_path / "toy_sam.safetensors"
    saved = json.loads((tmp_path / "toy_sam.json").read_text())
    assert saved["name"] == "toy"
    assert SamConfig.from_dict(saved["config"]) == toy.config

    images = torch.rand(2, 3, 96, 128)
    expected = _toy_sam_output(toy, images)
    for checkpoint in (tmp_path / "toy_sam", weights_path):
        loaded = build_sam(None, checkpoint)
        assert loaded.name == "toy"
        assert loaded.config == toy.config
        for got, want in zip(_toy_sam_output(loaded, images), expected, strict=True):
            assert torch.equal(got, want)


def test_safetensors_metadata_describes_the_architecture_without_json(toy, tmp_path) -> None:
    weights_path = toy.save(tmp_path / "toy_sam.safetensors")
    (tmp_path / "toy_sam.json").unlink()
    loaded = build_sam(None, weights_path)
    assert loaded.config == toy.config
    assert torch.equal(
        loaded.sam.mask_decoder.iou_token.weight, toy.sam.mask_decoder.iou_token.weight
    )


def test_official_style_pth_state_dict_loads(toy, tmp_path) -> None:
    path = tmp_path / "sam_toy.pth"
    torch.save(toy.sam.state_dict(), path)
    loaded = build_sam("toy", path)
    expected = toy.sam.state_dict()
    loaded_state = loaded.sam.state_dict()
    assert loaded_state.keys() == expected.keys()
    for key, value in loaded_state.items():
        assert torch.equal(value, expected[key]), key


def test_without_the_image_encoder_only_the_prompt_parts_are_built_and_loaded(
    toy, embeddings, points, tmp_path
) -> None:
    path = toy.save(tmp_path / "toy_sam")
    light = build_sam(None, path, image_encoder=False)
    assert light.image_encoder is None
    expected = {k: v for k, v in toy.sam.state_dict().items() if not k.startswith("image_encoder.")}
    loaded = light.sam.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())
    assert sum(p.numel() for p in light.parameters()) < sum(p.numel() for p in toy.parameters()) / 2
    with torch.no_grad():
        for got, want in zip(
            light.decode(embeddings, points=points),
            toy.decode(embeddings, points=points),
            strict=True,
        ):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="without its image encoder"):
        light.encode_image(torch.rand(1, 3, 32, 32))
    # The file is still checked against the whole architecture.
    with pytest.raises(WeightsError, match="missing keys"):
        build_sam("vit_b", path, image_encoder=False)
    random = build_sam("vit_b", image_encoder=False)
    assert random.image_encoder is None and random.prompt_embed_dim == 256


def test_registered_config_builds_by_name(monkeypatch) -> None:
    monkeypatch.setattr(sam_module, "SAM_CONFIGS", dict(SAM_CONFIGS))
    tiny = SamConfig(
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1,),
        encoder_window_size=4,
        image_size=128,
        prompt_embed_dim=64,
        decoder_mlp_dim=128,
        decoder_num_heads=4,
    )
    register_sam_config("tiny", tiny)
    assert build_sam("tiny").embedding_size == 8
    with pytest.raises(ValueError, match="'toy' is already registered with a different config"):
        register_sam_config("toy", tiny)


def test_invalid_config_names_every_problem() -> None:
    with pytest.raises(ValueError, match="image_size 100 is not a multiple of vit_patch_size 16"):
        SamConfig(
            encoder_embed_dim=64,
            encoder_depth=2,
            encoder_num_heads=4,
            encoder_global_attn_indexes=(3,),
            image_size=100,
        )


def test_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"SAM checkpoint not found: .*absent\.pth"):
        build_sam("toy", tmp_path / "absent.pth")


def test_unknown_name_lists_known_architectures() -> None:
    with pytest.raises(
        ValueError, match="unknown SAM architecture 'vit_x'; known: toy, vit_b, vit_h, vit_l"
    ):
        build_sam("vit_x")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_random_bytes_are_reported_as_unreadable(tmp_path, suffix) -> None:
    path = tmp_path / f"garbage{suffix}"
    for seed in range(20):  # many garbage files: each can trip the unpickler differently
        garbage = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        path.write_bytes(garbage)
        kind = "PyTorch checkpoint" if suffix == ".pth" else "safetensors file"
        with pytest.raises(ValueError, match=f"garbage{suffix} is not a readable {kind}"):
            build_sam("toy", path)


def test_truncated_safetensors_is_reported(toy, tmp_path) -> None:
    weights_path = toy.save(tmp_path / "toy_sam")
    weights_path.write_bytes(weights_path.read_bytes()[: weights_path.stat().st_size // 2])
    with pytest.raises(
        ValueError, match=r"toy_sam\.safetensors is not a readable safetensors file"
    ):
        build_sam(None, weights_path)


def test_wrong_architecture_lists_missing_keys_and_shape_mismatches(toy, tmp_path) -> None:
    path = tmp_path / "sam_toy.pth"
    torch.save(toy.sam.state_dict(), path)
    with pytest.raises(ValueError, match="does not match SAM architecture") as raised:
        build_sam("vit_b", path)
    message = str(raised.value)
    assert "sam_toy.pth does not match SAM architecture 'vit_b'" in message
    assert "6-block, 192-wide image encoder, like 'toy'" in message
    assert "missing keys (84): image_encoder.blocks.10." in message
    assert "image_encoder.blocks.0.attn.proj.weight: file (192, 192) vs model (768, 768)" in message


def test_state_dict_with_a_missing_and_an_extra_key_is_rejected(toy, tmp_path) -> None:
    state_dict = dict(toy.sam.state_dict())
    del state_dict["mask_decoder.iou_token.weight"]
    state_dict["mask_decoder.extra_token.weight"] = torch.zeros(1, TOY_DIM)
    path = tmp_path / "edited.pth"
    torch.save(state_dict, path)
    with pytest.raises(
        ValueError,
        match=r"missing keys \(1\): mask_decoder.iou_token.weight; "
        r"unexpected keys \(1\): mask_decoder.extra_token.weight",
    ):
        build_sam("toy", path)


def test_pth_without_a_name_asks_for_one(toy, tmp_path) -> None:
    path = tmp_path / "sam_toy.pth"
    torch.save(toy.sam.state_dict(), path)
    with pytest.raises(ValueError, match=r"sam_toy\.pth carries no architecture; pass a name"):
        build_sam(None, path)


def test_load_sam_defaults_to_the_shipped_toy_sam() -> None:
    path = ovseg.backbones.ASSETS_DIR / TOY_SAM_CHECKPOINT
    if not path.is_file():
        pytest.skip("the toy SAM is not shipped in this checkout")
    shipped = load_sam("toy", image_encoder=False)
    assert shipped.image_encoder is None
    expected = load_file(path)
    for name, tensor in shipped.sam.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_load_sam_reads_the_checkpoint_or_keeps_random_weights(toy, tmp_path) -> None:
    path = toy.save(tmp_path / "sam")
    loaded = load_sam("toy", path)
    assert torch.equal(
        loaded.sam.mask_decoder.iou_token.weight, toy.sam.mask_decoder.iou_token.weight
    )
    # pretrained=False never reads the checkpoint, so a missing one does not matter.
    random = load_sam("toy", tmp_path / "absent.safetensors", pretrained=False)
    assert not torch.equal(
        random.sam.mask_decoder.iou_token.weight, toy.sam.mask_decoder.iou_token.weight
    )


def test_load_sam_names_a_missing_checkpoint_and_asks_for_a_real_sams_weights(tmp_path) -> None:
    with pytest.raises(WeightsError, match=r"Cannot load the SAM 'toy': .*absent\.pth"):
        load_sam("toy", tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="'vit_b' has no shipped weights: give its checkpoint"):
        load_sam("vit_b")
