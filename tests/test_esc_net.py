import copy
import itertools
import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from segment_anything.modeling import ImageEncoderViT, PromptEncoder
from segment_anything.modeling.transformer import TwoWayAttentionBlock

import ovseg.backbones
from ovseg.backbones import WeightsError, build_sam, load_backbone
from ovseg.backbones.sam import GridPromptEncoder
from ovseg.errors import OptionError
from ovseg.methods.blocks import cosine_cost_volume
from ovseg.methods.esc_net import (
    EscNetConfig,
    build_esc_net,
    pseudo_prompts,
)
from ovseg.methods.weights import save_weights

PAPER_CONFIGS = sorted(
    (Path(__file__).resolve().parents[1] / "training" / "configs" / "paper").glob("esc-net*.json")
)

TEMPLATES = ("a photo of a {}.",)
VOCABULARY = ["cat", "dog", "sky", "grass", "road"]


@pytest.fixture(scope="module")
def sam_path(tmp_path_factory):
    """A toy-architecture SAM with random weights, saved the way real checkpoints are loaded."""
    torch.manual_seed(0)
    return build_sam("toy").save(tmp_path_factory.mktemp("sam") / "sam-test")


def small(toy_vit, sam_path, **changes):
    """The paper's architecture at a width, grid and window that run in milliseconds."""
    settings = dict(
        input_size=64,
        templates=TEMPLATES,
        hidden_dim=32,
        swin_heads=2,
        text_heads=2,
        window_size=4,
        decoder_dims=(16, 8),
        skip_dims=(8, 4),
        sam="toy",
        sam_checkpoint=str(sam_path),
        dense_prompt=EscNetConfig.dense_prompt,  # the paper's, not the shipped toy head's
    )
    settings.update(changes)
    return build_esc_net(backbone=toy_vit, **settings)


def randomise_activation_heads(method):
    """Give the zero-initialised S_k convs weights, so blocks 2–4 prompt from refined maps."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for vlf in method.fusion:
            weight = vlf.to_activation.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)


def images(batch=2, size=64, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def by_class(chunks, batch, attribute):
    """One block's pseudo prompts, chunked as ``(B·Kc)×…`` per chunk of classes, as ``B×K×…``."""
    return torch.cat([getattr(c, attribute).unflatten(0, (batch, -1)) for c in chunks], dim=1)


# ------------------------------------------------------------------ Pseudo Prompt Generator


def gaussian_blobs(height, width, centres, sigma=1.5):
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    blobs = [torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)) for x, y in centres]
    return torch.stack(blobs).amax(dim=0).float()


def test_ppg_puts_points_on_both_blob_peaks_and_covers_both_blobs():
    centres = [(3, 4), (12, 10)]
    maps = gaussian_blobs(16, 16, centres)[None] * 0.3  # cosine-like scale
    prompts = pseudo_prompts(maps, num_objects=5, tau=0.01)
    points = {tuple(p) for p in prompts.points[0].long().tolist()}
    assert set(centres) <= points
    for x, y in centres:
        assert prompts.regions[0, :, y, x].sum() == 1  # each peak in exactly one region
    assert prompts.points.shape == (1, 5, 2) and prompts.regions.shape == (1, 5, 16, 16)


def test_ppg_foreground_is_the_alpha_threshold_plus_the_top_objects():
    maps = torch.randn(3, 6, 7, generator=torch.Generator().manual_seed(0))
    prompts = pseudo_prompts(maps, num_objects=5, tau=0.5)
    probability = (maps.flatten(1) / 0.5).softmax(-1)
    expected = probability > 1 / 42
    expected.scatter_(1, maps.flatten(1).topk(5, dim=-1).indices, True)
    assert torch.equal(prompts.foreground.flatten(1), expected)
    assert torch.allclose(prompts.probability.flatten(1), probability)


def test_ppg_regions_are_disjoint_and_their_union_is_the_foreground():
    maps = torch.randn(6, 12, 12, generator=torch.Generator().manual_seed(1))
    prompts = pseudo_prompts(maps, num_objects=5, tau=0.1)
    counts = prompts.regions.sum(dim=1)
    assert counts.max() <= 1
    assert torch.equal(counts.bool(), prompts.foreground)
    # Each point is the best-scoring pixel of its region (panel e).
    for row, region in itertools.product(range(6), range(5)):
        x, y = prompts.points[row, region].long().tolist()
        inside = maps[row][prompts.regions[row, region]]
        assert prompts.regions[row, region, y, x] and maps[row, y, x] == inside.max()


@pytest.mark.parametrize(
    "name, values",
    [
        ("flat", torch.zeros(1, 9, 9)),
        (
            "single hot pixel",
            torch.zeros(1, 9, 9).index_put_((torch.tensor([0]),) * 3, torch.tensor([1.0])),
        ),
        ("all negative", -torch.rand(1, 9, 9, generator=torch.Generator().manual_seed(2)) - 1),
        ("grid smaller than N_o", torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(3))),
    ],
)
def test_ppg_degenerate_maps_give_exactly_n_o_finite_prompts(name, values):
    prompts = pseudo_prompts(values, num_objects=5)
    assert prompts.points.shape == (1, 5, 2) and prompts.regions.shape == (1, 5, *values.shape[1:])
    assert torch.isfinite(prompts.points).all() and torch.isfinite(prompts.probability).all()
    assert prompts.regions.flatten(2).any(-1).all(), name  # no empty region
    for region in range(5):
        x, y = prompts.points[0, region].long().tolist()
        assert prompts.regions[0, region, y, x]


def test_ppg_is_deterministic_batched_and_without_gradient():
    maps = torch.randn(4, 10, 10, generator=torch.Generator().manual_seed(4), requires_grad=True)
    first, second = pseudo_prompts(maps), pseudo_prompts(maps)
    assert torch.equal(first.points, second.points) and torch.equal(first.regions, second.regions)
    alone = pseudo_prompts(maps[2:3])
    assert torch.equal(alone.points[0], first.points[2])
    assert torch.equal(alone.regions[0], first.regions[2])
    assert not first.points.requires_grad and not first.probability.requires_grad


def test_ppg_boxes_are_tight_inclusive_boxes_around_their_regions():
    maps = torch.randn(3, 11, 9, generator=torch.Generator().manual_seed(5))
    prompts = pseudo_prompts(maps, tau=0.2)
    for row, region in itertools.product(range(3), range(5)):
        ys, xs = torch.nonzero(prompts.regions[row, region], as_tuple=True)
        x0, y0, x1, y1 = prompts.boxes[row, region].long().tolist()
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_box_corners_reach_sam_at_the_centres_of_the_regions_corner_cells(sam_path):
    """SAM adds half a cell to box corners: with inclusive boxes a corner is the centre of the
    region's first or last cell, and a region at the grid's edge keeps its box inside [0, 1]."""
    maps = torch.full((2, 8, 8), -1.0)
    maps[0, 1:4, 2:6] = 1.0  # rows 1–3, columns 2–5
    maps[1, 5:8, 6:8] = 1.0  # the bottom-right corner
    prompts = pseudo_prompts(maps, num_objects=1)
    assert prompts.boxes[:, 0].tolist() == [[2, 1, 5, 3], [6, 5, 7, 7]]
    sam = build_sam(None, sam_path)
    encoding = GridPromptEncoder(source=sam.prompt_encoder, grid=8, prompt_types=("box",))
    sparse, _ = encoding(prompts.points, prompts.boxes, prompts.regions)
    pe = encoding.dense_pe((8, 8))
    top_left, bottom_right = (e.weight[0] for e in sam.prompt_encoder.point_embeddings[2:])
    for row, (x0, y0, x1, y1) in enumerate([(2, 1, 5, 3), (6, 5, 7, 7)]):
        torch.testing.assert_close(sparse[row, 0], pe[:, y0, x0] + top_left, atol=1e-5, rtol=0)
        torch.testing.assert_close(sparse[row, 1], pe[:, y1, x1] + bottom_right, atol=1e-5, rtol=0)


def test_training_free_boxes_span_their_regions_pixels_inside_sams_frame(
    toy_vit, sam_path, monkeypatch
):
    method = small(toy_vit, sam_path, training_free_box=True)
    sam = method.training_free_sam.on(torch.device("cpu"))
    seen = []
    decode = sam.decode
    monkeypatch.setattr(sam, "decode", lambda *a, **k: seen.append(k["boxes"]) or decode(*a, **k))
    out = method(images(1), VOCABULARY[:3], return_intermediates=True)
    [[prompts]] = out.intermediates["pseudo_prompts"]  # one set of one chunk: 1 image × 3 classes
    boxes = torch.cat(seen).view(3, 5, 4)
    stride, scale = 8, sam.image_size / 64  # toy ViT patches; SAM's ResizeLongestSide
    for row, region in itertools.product(range(3), range(5)):
        ys, xs = torch.nonzero(prompts.regions[row, region], as_tuple=True)
        first = torch.tensor([xs.min(), ys.min()]) * stride * scale
        last = (torch.tensor([xs.max(), ys.max()]) * stride + stride - 1) * scale
        assert boxes[row, region].tolist() == [*first.tolist(), *last.tolist()]
    assert boxes.min() >= 0 and boxes.max() <= sam.image_size - 1


# ---------------------------------------------------------------------------- SAM weights


def test_sam_layers_and_prompt_encoder_equal_the_checkpoint_bit_for_bit(toy_vit, sam_path):
    method = small(toy_vit, sam_path)
    checkpoint = load_file(sam_path)
    for index, block in enumerate(method.sam_blocks):
        source = f"mask_decoder.transformer.layers.{index % 2}."
        for name, tensor in block.layer.state_dict().items():
            assert torch.equal(tensor, checkpoint[source + name]), (index, name)
    assert [b.layer.skip_first_layer_pe for b in method.sam_blocks] == [True, False, True, False]
    encoder_state = method.prompt_encoding.encoder.state_dict()
    assert "pe_layer.positional_encoding_gaussian_matrix" in encoder_state
    for name, tensor in encoder_state.items():
        assert torch.equal(tensor, checkpoint["prompt_encoder." + name]), name
    # The blocks are independent copies: training one does not move another.
    assert (
        method.sam_blocks[0].layer.mlp.lin1.weight is not method.sam_blocks[2].layer.mlp.lin1.weight
    )
    # SAM's image encoder is not part of the model.
    names = [name for name, _ in method.named_parameters()] + list(method.state_dict())
    assert not any("image_encoder" in name for name in names)


def test_an_official_style_pth_checkpoint_loads_the_same_weights(toy_vit, sam_path, tmp_path):
    pth = tmp_path / "sam_toy.pth"
    torch.save(load_file(sam_path), pth)
    from_pth = small(toy_vit, sam_path, sam_checkpoint=str(pth))
    from_safetensors = small(toy_vit, sam_path)
    expected = from_safetensors.sam_blocks.state_dict()
    loaded = from_pth.sam_blocks.state_dict()
    layers = [name for name in expected if ".layer." in name]
    assert layers and all(torch.equal(expected[name], loaded[name]) for name in layers)


def test_random_sam_ablation_differs_from_the_checkpoint(toy_vit, sam_path):
    method = small(toy_vit, sam_path, sam_pretrained=False)
    checkpoint = load_file(sam_path)
    weight = method.sam_blocks[0].layer.mlp.lin1.weight
    assert not torch.equal(weight, checkpoint["mask_decoder.transformer.layers.0.mlp.lin1.weight"])
    assert method.training_free_sam.loaded is None


def test_without_sam_there_is_no_ppg_prompt_encoder_or_sam_block(toy_vit, sam_path):
    method = small(toy_vit, sam_path, use_sam=False)
    assert not hasattr(method, "sam_blocks") and not hasattr(method, "prompt_encoding")
    assert not any("sam" in group["name"] for group in method.parameter_groups(2e-4))
    method.trained_head = True
    out = method(images(1), VOCABULARY[:3], return_intermediates=True)
    assert "pseudo_prompts" not in out.intermediates and out.logits.shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    "types, tokens",
    [
        (("point",), 6),
        (("box",), 10),
        (("point", "box"), 15),
        (("point", "mask"), 6),
        (("box", "mask"), 10),
        (("point", "box", "mask"), 15),
        (("mask",), 0),
    ],
)
def test_prompt_type_ablations_embed_the_expected_tokens(toy_vit, sam_path, types, tokens):
    sam = build_sam(None, sam_path)
    encoding = GridPromptEncoder(source=sam.prompt_encoder, grid=8, prompt_types=types)
    prompts = pseudo_prompts(torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(6)))
    sparse, dense = encoding(prompts.points, prompts.boxes, prompts.regions)
    assert sparse.shape == (3, tokens, 128) and dense.shape == (3, 128, 8, 8)
    no_mask = sam.prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1)
    assert torch.equal(dense, no_mask.expand_as(dense)) == ("mask" not in types)
    if types == ("point",):
        # Points in grid units: their encoding is the dense PE of their cell plus SAM's
        # foreground-point embedding; the last token is SAM's padding point.
        pe = encoding.dense_pe((8, 8))
        x, y = prompts.points[0, 0].long().tolist()
        foreground = sam.prompt_encoder.point_embeddings[1].weight[0]
        assert torch.allclose(sparse[0, 0], pe[:, y, x] + foreground, atol=1e-5)
        assert torch.equal(sparse[0, -1], sam.prompt_encoder.not_a_point_embed.weight[0])
    method = small(toy_vit, sam_path, prompt_types=types, num_blocks=1)
    method.trained_head = True
    assert method(images(1), VOCABULARY[:2]).logits.shape == (1, 2, 64, 64)


# ------------------------------------------------------------------------------ the model


def test_head_shapes_and_block_intermediates_at_toy_scale(toy_vit, sam_path):
    method = small(toy_vit, sam_path)
    method.trained_head = True
    out = method(images(2), VOCABULARY[:3], return_intermediates=True)
    inter = out.intermediates
    assert out.logits.shape == (2, 3, 64, 64)
    assert inter["cost_volume"].shape == (2, 3, 8, 8)
    assert inter["activation_maps"].shape == (2, 5, 3, 8, 8)
    blocks = inter["pseudo_prompts"]  # per block, one chunk of 2 images × 3 classes
    assert len(blocks) == 4 and all(len(chunks) == 1 for chunks in blocks)
    for [prompts] in blocks:
        assert prompts.points.shape == (6, 5, 2)
        assert prompts.regions.shape == (6, 5, 8, 8)
        assert prompts.boxes.shape == (6, 5, 4)
    # S_0 is Eq. 1; with the zero-initialised S_k convs every block prompts from it.
    text = toy_vit.encode_text(VOCABULARY[:3], TEMPLATES).mean
    features = method.encode_image(images(2))
    assert torch.allclose(
        inter["activation_maps"][:, 0], cosine_cost_volume(features.clip.dense, text)
    )
    for block in range(1, 5):
        assert torch.equal(inter["activation_maps"][:, block], inter["activation_maps"][:, 0])
    expected = pseudo_prompts(inter["cost_volume"].flatten(0, 1))
    assert torch.equal(blocks[3][0].points, expected.points)


def test_permuting_the_classes_permutes_the_logits(toy_vit, sam_path):
    method = small(toy_vit, sam_path)
    randomise_activation_heads(method)
    method.trained_head = True
    features = method.encode_image(images(2))
    order = [3, 0, 4, 1, 2]
    with torch.no_grad():
        logits = method.segment(features, VOCABULARY).logits
        permuted = method.segment(features, [VOCABULARY[i] for i in order]).logits
    assert torch.allclose(permuted, logits[:, order], atol=1e-5)


def test_chunked_and_unchunked_classes_agree(toy_vit, sam_path):
    method = small(toy_vit, sam_path, class_chunk_size=128)
    randomise_activation_heads(method)
    chunked = small(toy_vit, sam_path, class_chunk_size=2)
    chunked.load_state_dict(method.state_dict())
    for m in (method, chunked):
        m.trained_head = True
    with torch.no_grad():
        whole = method(images(2), VOCABULARY, return_intermediates=True)
        parts = chunked(images(2), VOCABULARY, return_intermediates=True)
    assert torch.allclose(whole.logits, parts.logits, atol=1e-5)
    assert [len(chunks) for chunks in parts.intermediates["pseudo_prompts"]] == [3] * 4
    for whole_block, chunked_block in zip(
        whole.intermediates["pseudo_prompts"], parts.intermediates["pseudo_prompts"], strict=True
    ):
        for attribute in ("points", "regions", "boxes"):
            assert torch.equal(
                by_class(whole_block, 2, attribute), by_class(chunked_block, 2, attribute)
            )


def test_one_class_works(toy_vit, sam_path):
    method = small(toy_vit, sam_path)
    method.trained_head = True
    assert method(images(1), ["cat"]).logits.shape == (1, 1, 64, 64)


@pytest.mark.slow
def test_847_classes_run_with_the_same_weights(toy_vit, sam_path):
    method = small(toy_vit, sam_path, class_chunk_size=256)
    method.trained_head = True
    with torch.no_grad():
        out = method(images(1), [f"class {i}" for i in range(847)])
    assert out.logits.shape == (1, 847, 64, 64) and torch.isfinite(out.logits).all()


def test_loss_is_per_pixel_bce_and_gradients_reach_sam_and_clip_qv_only(toy_vit, sam_path):
    method = small(copy.deepcopy(toy_vit), sam_path).train()  # training splits CLIP's K off
    target = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(0))
    target[:, :8] = 255
    out = method(images(2), VOCABULARY[:3], target=target)
    loss = method.loss(out, target)["loss_bce"]
    valid = target != 255
    one_hot = F.one_hot(target.clamp_max(2), 3).permute(0, 3, 1, 2).float()
    manual = F.binary_cross_entropy_with_logits(out.logits, one_hot, reduction="none")
    assert torch.allclose(loss, manual.permute(0, 2, 3, 1)[valid].mean())
    loss.backward()
    for block in method.sam_blocks:
        assert block.layer.cross_attn_image_to_token.q_proj.weight.grad.abs().sum() > 0
    encoder = method.prompt_encoding.encoder
    assert encoder.mask_downscaling[0].weight.grad.abs().sum() > 0
    assert encoder.point_embeddings[1].weight.grad.abs().sum() > 0
    assert encoder.point_embeddings[2].weight.grad is None  # no boxes in the default
    # Q and V train; K is split off as a buffer (tests/test_clip_finetuning.py).
    attention = method.backbone.model.visual.transformer.resblocks[0].attn
    grad = attention.parametrizations.in_proj_weight.original.grad
    width = attention.embed_dim
    assert grad[:width].abs().sum() > 0 and grad[width:].abs().sum() > 0
    assert method.backbone.model.visual.conv1.weight.grad is None


def test_optimiser_groups_put_clip_and_sam_at_2e_6_and_the_rest_at_2e_4(toy_vit, sam_path):
    method = small(toy_vit, sam_path)
    groups = method.parameter_groups(2e-4)
    by_id = {id(p): group for group in groups for p in group["params"]}
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    assert len(by_id) == len(trainable) == sum(len(g["params"]) for g in groups)
    for name, parameter in trainable:
        slow = name.startswith(("backbone.", "prompt_encoding.")) or (
            name.startswith("sam_blocks.") and ".layer." in name
        )
        assert math.isclose(by_id[id(parameter)]["lr"], 2e-6 if slow else 2e-4), name
    assert by_id[id(method.sam_blocks[0].fuse.weight)]["lr"] == 2e-4
    torch.optim.AdamW(groups)


# ------------------------------------------------------------------------ training-free path


def test_training_free_path_labels_sam_masks_by_their_class(toy_vit, sam_path):
    method = small(toy_vit, sam_path)
    assert not method.trained_head
    out = method(images(1), VOCABULARY[:3], return_intermediates=True)
    inter = out.intermediates
    cost = inter["cost_volume"]
    class_log_prob = F.interpolate(
        (cost / 0.01).log_softmax(1), size=(64, 64), mode="bilinear", align_corners=False
    )
    assert torch.allclose(out.logits, class_log_prob + inter["sam_masks"].log(), atol=1e-4)
    [[prompts]] = inter["pseudo_prompts"]  # one set of one chunk: 1 image × 3 classes
    assert prompts.points.shape == (3, 5, 2)
    assert torch.equal(prompts.points, pseudo_prompts(cost[0]).points)


def test_training_free_without_a_pretrained_sam_is_dense_clip(toy_vit, sam_path):
    method = small(toy_vit, sam_path, sam_pretrained=False)
    out = method(images(1), VOCABULARY[:3], return_intermediates=True)
    cost = out.intermediates["cost_volume"]
    expected = F.interpolate((cost / 0.01).log_softmax(1), size=(64, 64), mode="bilinear")
    assert torch.allclose(out.logits, expected, atol=1e-5)


def test_default_build_uses_the_shipped_toy_sam_and_no_head(toy_vit):
    if not (ovseg.backbones.ASSETS_DIR / "sam-toy" / "sam-toy.safetensors").is_file():
        pytest.skip("the toy SAM is not shipped in this checkout")
    method = build_esc_net(backbone=toy_vit, input_size=64, window_size=4)
    assert not method.trained_head
    method(images(1), VOCABULARY[:2])
    assert method.training_free_sam.loaded.name == "toy"


# -------------------------------------------------------------------------------- weights


def test_saved_weights_reload_into_a_trained_head(toy_vit, sam_path, tmp_path):
    method = small(toy_vit, sam_path)
    randomise_activation_heads(method)
    method.trained_head = True
    path = save_weights(method, tmp_path / "esc")
    loaded = build_esc_net(backbone=toy_vit, weights=str(path))
    assert loaded.trained_head and loaded.config == method.config
    with torch.no_grad():
        assert torch.allclose(
            loaded(images(1), VOCABULARY).logits, method(images(1), VOCABULARY).logits
        )
    with pytest.raises(WeightsError):
        build_esc_net(backbone=toy_vit, weights=str(tmp_path / "missing"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError):
        small(toy_vit, sam_path, weights=str(tmp_path / "bad.safetensors"))


def test_bad_settings_and_stale_features_are_rejected(toy_vit, toy_convnext, sam_path):
    with pytest.raises(ValueError, match="prompt_types"):
        EscNetConfig(prompt_types=("point", "scribble"))
    with pytest.raises(ValueError, match="sam_checkpoint"):
        build_esc_net(backbone=toy_vit, sam="vit_b")
    with pytest.raises(ValueError, match=r"needs a ViT CLIP; .* has a convnext image tower"):
        small(toy_convnext, sam_path)
    with pytest.raises(ValueError, match="input_size 60 is not a multiple of the patch size 8"):
        small(toy_vit, sam_path, input_size=60)
    method = small(toy_vit, sam_path)
    features = method.encode_image(images(1))
    method.trained_head = True
    with pytest.raises(ValueError, match="re-encode"):
        method.segment(features, VOCABULARY)
    with pytest.raises(ValueError, match=r"built for a 8×8 grid .* on a 10×10 grid"):
        method(images(1, size=80), VOCABULARY)
    with pytest.raises(ValueError, match="options"):
        method(images(1), VOCABULARY, theta=0.3)


# ----------------------------------------------------------------------------- real scale


@pytest.mark.slow
def test_real_scale_shapes_vit_b_16_at_384_with_sam_vit_b_blocks():
    clip = load_backbone("ViT-B-16", None)  # random weights, no download
    method = build_esc_net(
        backbone=clip, input_size=384, sam="vit_b", sam_pretrained=False, templates="single"
    )
    method.trained_head = True
    assert method.skip_layers == (3, 7)
    with torch.no_grad():
        out = method(torch.rand(1, 3, 384, 384), ["cat", "dog"], return_intermediates=True)
    assert out.logits.shape == (1, 2, 384, 384)
    assert out.intermediates["cost_volume"].shape == (1, 2, 24, 24)
    blocks = out.intermediates["pseudo_prompts"]
    assert [[p.regions.shape for p in chunks] for chunks in blocks] == [[(2, 5, 24, 24)]] * 4
    head = sum(p.numel() for n, p in method.named_parameters() if not n.startswith("backbone."))
    sam_layers = sum(p.numel() for b in method.sam_blocks for p in b.layer.parameters())
    assert sam_layers == 4 * 1_579_520  # spec §2.5: one TwoWayAttentionBlock each
    assert 8e6 < head < 14e6  # spec §6: ~10–11M of ESC-specific parameters


def grid_prompt_encoder(sam, grid=8):
    """segment-anything's own prompt encoder for a grid×grid embedding, with the SAM's weights."""
    encoder = PromptEncoder(
        embed_dim=sam.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(grid, grid),
        mask_in_chans=sam.config.mask_in_chans,
    )
    encoder.load_state_dict(sam.prompt_encoder.state_dict())
    return encoder


def mask_logits(masks, kappa=10.0):
    """``R×h×w`` bool masks → SAM mask-prompt logits ``R×1×4h×4w``."""
    upsampled = F.interpolate(masks[:, None].float(), scale_factor=4, mode="nearest")
    return kappa * (2 * upsampled - 1)


def test_prompts_are_sams_own_encoding_of_the_points_and_the_regions_union(toy_vit, sam_path):
    """A9: the dense prompt of a class is SAM's mask prompt of the union of its regions (one mask
    per prompt set), and the sparse prompt SAM's encoding of the N_o points."""
    method = small(toy_vit, sam_path)
    reference = grid_prompt_encoder(build_sam(None, sam_path))
    prompts = pseudo_prompts(torch.randn(6, 8, 8, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(prompts.regions.any(dim=1), prompts.foreground)
    with torch.no_grad():
        sparse, dense = method.prompt_encoding(prompts.points, prompts.boxes, prompts.regions)
        expected_sparse, expected_dense = reference(
            points=(prompts.points, torch.ones(6, 5)),
            boxes=None,
            masks=mask_logits(prompts.foreground),
        )
    torch.testing.assert_close(sparse, expected_sparse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, expected_dense, atol=1e-5, rtol=1e-5)


def test_the_mean_of_region_prompts_is_the_union_at_one_n_o_th_strength(sam_path):
    """Why the average of the N_o region embeddings (the shipped head's "mean") loses the regions:
    SAM's mask downscaling gives one vector per cell, d1 inside a mask and d0 outside."""
    sam = build_sam(None, sam_path)
    encoding = GridPromptEncoder(
        source=sam.prompt_encoder, grid=8, prompt_types=("mask",), dense_prompt="mean"
    )
    prompts = pseudo_prompts(torch.randn(6, 8, 8, generator=torch.Generator().manual_seed(1)))
    reference = grid_prompt_encoder(sam)
    with torch.no_grad():
        _, dense = encoding(prompts.points, prompts.boxes, prompts.regions)
        per_region = reference._embed_masks(mask_logits(prompts.regions.flatten(0, 1)))
        d1 = reference._embed_masks(mask_logits(torch.ones(1, 8, 8, dtype=torch.bool)))
        d0 = reference._embed_masks(mask_logits(torch.zeros(1, 8, 8, dtype=torch.bool)))
    torch.testing.assert_close(
        dense, per_region.view(6, 5, -1, 8, 8).mean(dim=1), atol=1e-5, rtol=0
    )
    foreground = prompts.foreground[:, None].float()
    torch.testing.assert_close(dense, d0 + foreground / 5 * (d1 - d0), atol=1e-5, rtol=0)


def test_sam_blocks_equal_segment_anythings_two_way_block_run_class_by_class(toy_vit, sam_path):
    """Eq. 2 against segment-anything: each class's tokens [text ; SAM prompt encoding] and keys
    (vision features + dense prompt, SAM's dense PE) through the checkpoint's own
    TwoWayAttentionBlock one class at a time, then the mean over classes fused with the block
    input."""
    method = small(toy_vit, sam_path)
    method.trained_head = True
    sam = build_sam(None, sam_path)
    reference = grid_prompt_encoder(sam)
    key_pe = reference.get_dense_pe().flatten(2).permute(0, 2, 1)  # as TwoWayTransformer does
    vocabulary = VOCABULARY[:3]
    with torch.no_grad():
        features = method.encode_image(images(2))
        text = method.backbone.encode_text(vocabulary, TEMPLATES).mean
        cost = cosine_cost_volume(features.clip.dense, text)
        vision_features = method.image_projection(features.clip.dense)
        text_tokens = method.text_token(text)
        for index in range(2):
            block = method.esc_block(index, vision_features, cost, None, text, text_tokens)
            fused = block.vision_features
            layer = sam.mask_decoder.transformer.layers[index]
            assert isinstance(layer, TwoWayAttentionBlock)
            refined = torch.zeros(2, 64, vision_features.shape[1])
            for b, n in itertools.product(range(2), range(3)):
                prompts = pseudo_prompts(cost[b, n][None])
                sparse, dense = reference(
                    points=(prompts.points, torch.ones(1, 5)),
                    boxes=None,
                    masks=mask_logits(prompts.foreground),
                )
                tokens = torch.cat([text_tokens[n][None, None], sparse], dim=1)
                keys = (vision_features[b : b + 1] + dense).flatten(2).permute(0, 2, 1)
                _, keys = layer(queries=tokens, keys=keys, query_pe=tokens, key_pe=key_pe)
                refined[b] += keys[0] / 3
            refined = refined.transpose(1, 2).reshape(vision_features.shape)
            expected = method.sam_blocks[index].fuse(torch.cat([vision_features, refined], dim=1))
            torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-4)


def test_each_blocks_prompts_come_from_the_previous_blocks_activation_map(toy_vit, sam_path):
    """Block k's PPG reads S_{k-1} (A11), not the cosine map S_0 again."""
    torch.manual_seed(0)  # the head's initialisation decides how far the maps move
    method = small(toy_vit, sam_path)
    randomise_activation_heads(method)
    method.trained_head = True
    with torch.no_grad():
        inter = method(images(2), VOCABULARY[:3], return_intermediates=True).intermediates
    maps = inter["activation_maps"]
    from_cost_volume = pseudo_prompts(maps[:, 0].flatten(0, 1)).regions
    moved = 0
    for block in range(4):
        expected = pseudo_prompts(maps[:, block].flatten(0, 1))
        [prompts] = inter["pseudo_prompts"][block]  # one chunk of 2 images × 3 classes
        assert torch.equal(prompts.regions, expected.regions)
        assert torch.equal(prompts.points, expected.points)
        moved += not torch.equal(expected.regions, from_cost_volume)
    # The refined maps do prompt differently (how many of the three blocks move is up to the
    # random weights); a block reading S_0 would then fail the equalities above.
    assert moved >= 1


# ------------------------------------------------------------------------- SAM loading (lazy)


def test_head_weights_build_without_the_sam_checkpoint(toy_vit, sam_path, tmp_path):
    """The head file holds every SAM part the head uses; the SAM file is needed only by the
    training-free path, and is read (and its absence reported) only when that path runs."""
    method = small(toy_vit, sam_path)
    randomise_activation_heads(method)
    method.trained_head = True
    path = save_weights(method, tmp_path / "esc")
    missing = tmp_path / "no-such-sam.safetensors"
    loaded = build_esc_net(backbone=toy_vit, weights=str(path), sam_checkpoint=str(missing))
    assert loaded.trained_head and loaded.training_free_sam.loaded is None
    assert not any(isinstance(module, ImageEncoderViT) for module in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(images(1), VOCABULARY).logits, method(images(1), VOCABULARY).logits
        )
    loaded.trained_head = False
    with pytest.raises(WeightsError, match="no-such-sam"):
        loaded(images(1), VOCABULARY)


def test_sams_image_encoder_is_loaded_only_when_the_training_free_path_runs(toy_vit, sam_path):
    method = small(copy.deepcopy(toy_vit), sam_path)  # training splits CLIP's K off
    assert not method.trained_head and method.training_free_sam.loaded is None
    assert not any(isinstance(module, ImageEncoderViT) for module in method.modules())
    method.train()
    method(images(1), VOCABULARY[:2])  # the head trains without it
    assert method.training_free_sam.loaded is None
    method.eval()
    method(images(1), VOCABULARY[:2])
    encoder = method.training_free_sam.loaded.image_encoder
    checkpoint = load_file(sam_path)["image_encoder.patch_embed.proj.weight"]
    assert torch.equal(encoder.patch_embed.proj.weight, checkpoint)


# ------------------------------------------------------------------------------ Swin windows


def test_every_paper_config_tiles_its_patch_grid_with_whole_windows():
    assert [path.stem for path in PAPER_CONFIGS] == ["esc-net-vit-b-16-336", "esc-net-vit-l-14-336"]
    for path in PAPER_CONFIGS:
        config = EscNetConfig(**json.loads(path.read_text())["method_config"])
        patch = open_clip.get_model_config(config.backbone)["vision_cfg"]["patch_size"]
        grid, remainder = divmod(config.input_size, patch)
        assert remainder == 0 and grid % config.window_size == 0, path.stem
        assert not config.window_padding, path.stem


def test_a_grid_of_partial_windows_is_an_error_unless_padding_is_asked_for(toy_vit, sam_path):
    method = small(toy_vit, sam_path, input_size=80)  # a 10×10 grid, windows of 4
    method.trained_head = True
    with pytest.raises(OptionError, match="window_size 4 does not divide"):
        method(images(1, size=80), VOCABULARY[:2])
    padded = small(toy_vit, sam_path, input_size=80, window_padding=True)
    padded.trained_head = True
    assert padded(images(1, size=80), VOCABULARY[:2]).logits.shape == (1, 2, 80, 80)
