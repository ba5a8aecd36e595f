"""DPSeg (CVPR 2025): the acceptance checks of specs/dpseg.md §9 on small random models."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovseg
from ovseg import backbones as backbone_registry
from ovseg.backbones import WeightsError, load_backbone
from ovseg.demo.views import dpseg_cost_volumes
from ovseg.images import crop_class_region
from ovseg.methods.base import SegmentationOutput
from ovseg.methods.blocks import cosine_cost_volume
from ovseg.methods.builder import METHODS
from ovseg.methods.chunking import upsample_logits
from ovseg.methods.dpseg import (
    DPSeg,
    DPSegConfig,
    DualPrompts,
    HybridDilatedConv,
    VisualCostProjection,
    build_dpseg,
    dual_prompt_cost_volume,
)
from ovseg.methods.weights import save_weights
from ovseg.prompts.visual import PromptGallery
from training.dpseg_paper import PAPER_ABLATIONS, PAPER_RESULTS, TRAINING_RECIPE

TEMPLATES = (
    "a photo of a {}.",
    "a {} in the scene.",
    "a photo of many {}.",
    "a sculpture of a {}.",
)
VOCABULARY = ["sky", ("grass", "lawn"), "cat", "dog"]
PAPER_CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs" / "paper"
SIZE = 128


def small_config(cache_dir, **changes) -> DPSegConfig:
    settings = {
        "templates": TEMPLATES,
        "input_size": SIZE,
        "prompts_per_class": 2,
        "prompt_resolution": 64,
        "prompt_cache_dir": str(cache_dir),
    }
    return DPSegConfig(**(settings | changes))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("visual_prompts")


@pytest.fixture(scope="module")
def backbone(toy_convnext):
    # Not the session fixture itself: DPSeg sets its backbone's requires_grad flags.
    return copy.deepcopy(toy_convnext)


@pytest.fixture(scope="module")
def model(backbone, cache_dir):
    torch.manual_seed(0)
    return DPSeg(config=small_config(cache_dir), backbone=backbone).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def features(model, images):
    with torch.no_grad():
        return model.encode_image(images[:1])


def decoded_shapes(method, features, prompts):
    """``method.decode``'s logits, and the shapes of F_c, F and each stage's output D1-D3
    (``B×K×C×h×w``; the stages' output is read by hooks, as they run per chunk of classes)."""
    batch = features.embeddings.shape[0]
    chunks = {f"D{index + 1}": [] for index in range(len(method.decoder.stages))}
    handles = [
        stage.fuse[-1].register_forward_hook(
            lambda module, inputs, output, name=name: chunks[name].append(output.shape)
        )
        for name, stage in zip(chunks, method.decoder.stages, strict=True)
    ]
    try:
        logits = method.decode(features, prompts)
    finally:
        for handle in handles:
            handle.remove()
    shapes = {
        name: (batch, sum(shape[0] for shape in outputs) // batch, *outputs[0][1:])
        for name, outputs in chunks.items()
    }
    with torch.no_grad():
        cost_volume = dual_prompt_cost_volume(features.embeddings, prompts, method.config)
        shapes |= {
            "F_c": tuple(cost_volume.shape),
            "F": tuple(method.cost_embedding(cost_volume).shape),
        }
    return logits, shapes


# --------------------------------------------------------------------- 1. encoder shapes


@pytest.mark.slow
def test_convnext_b_shapes_at_768_match_the_paper(cache_dir):
    backbone = load_backbone("convnext_base_w_320", None)
    assert backbone.layer_dims == [128, 256, 512, 1024] and backbone.embed_dim == 640
    sprites = {"prompt_generator": "toyworld", "prompts_per_class": 1, "input_size": 768}
    full = DPSeg(config=small_config(cache_dir, templates="imagenet", **sprites), backbone=backbone)
    with torch.no_grad():
        prompts = full.dual_prompts(["cat", "dog"], 1)
    assert prompts.text.shape == (1, 2, 80, 640) and prompts.visual.shape == (1, 2, 80, 640)
    assert [tuple(p.shape) for p in prompts.pooled] == [
        (1, 2, 80, 128),
        (1, 2, 80, 256),
        (1, 2, 80, 512),
    ]
    # One forward at batch 1, K = 2, M = 2 templates.
    method = DPSeg(
        config=small_config(cache_dir, templates=TEMPLATES[:2], **sprites), backbone=backbone
    )
    with torch.no_grad():
        features = method.eval().encode_image(torch.rand(1, 3, 768, 768))
        logits, shapes = decoded_shapes(method, features, method.dual_prompts(["cat", "dog"], 1))
    assert features.embeddings.shape == (1, 640, 24, 24)
    assert [tuple(e.shape) for e in features.guidance] == [
        (1, 128, 192, 192),
        (1, 256, 96, 96),
        (1, 512, 48, 48),
    ]
    assert shapes["F_c"] == (1, 2, 2, 24, 24) and shapes["F"] == (1, 2, 128, 24, 24)
    assert shapes["D1"] == (1, 2, 64, 48, 48)
    assert shapes["D2"] == (1, 2, 32, 96, 96)
    assert shapes["D3"] == (1, 2, 16, 192, 192)
    assert logits.shape == (1, 2, 192, 192)


@pytest.mark.slow
def test_convnext_l_dimensions(cache_dir):
    backbone = load_backbone("convnext_large_d_320", None)
    assert backbone.layer_dims == [192, 384, 768, 1536] and backbone.embed_dim == 768
    method = DPSeg(config=small_config(cache_dir, prompt_generator="toyworld"), backbone=backbone)
    guidance_inputs = [stage.guidance[0].in_channels for stage in method.decoder.stages]
    assert guidance_inputs == [768, 384, 192]
    assert [stage.guidance[0].out_channels for stage in method.decoder.stages] == [32, 16, 8]


def test_vit_backbones_are_refused(toy_vit, cache_dir):
    with pytest.raises(ValueError, match="hierarchical"):
        DPSeg(config=small_config(cache_dir, backbone="toy-vit"), backbone=toy_vit)


# ------------------------------------------------------------------------- 2. F_c (Eq. 1)


def test_main_cost_volume_matches_a_per_pixel_cosine_loop(model):
    generator = torch.Generator().manual_seed(1)
    dim = model.backbone.embed_dim
    image = torch.randn(2, dim, 3, 4, generator=generator)
    text = torch.randn(2, 3, 4, dim, generator=generator)
    visual = torch.randn(2, 3, 4, dim, generator=generator)
    cost = dual_prompt_cost_volume(
        image, DualPrompts(text=text, visual=visual, pooled=()), model.config
    )
    assert cost.shape == (2, 3, 4, 3, 4)
    expected = torch.empty_like(cost)
    for b, k, m, y, x in itertools.product(*(range(n) for n in cost.shape)):
        dual = (visual[b, k, m] / visual[b, k, m].norm() + text[b, k, m] / text[b, k, m].norm()) / 2
        pixel = image[b, :, y, x]
        expected[b, k, m, y, x] = pixel @ dual / (pixel.norm() * dual.norm())
    torch.testing.assert_close(cost, expected, atol=1e-5, rtol=0)
    assert cost.abs().max() <= 1
    scaled = DualPrompts(text=3.5 * text, visual=0.2 * visual, pooled=())
    torch.testing.assert_close(
        dual_prompt_cost_volume(image, scaled, model.config), cost, atol=1e-6, rtol=0
    )
    same = DualPrompts(text=text, visual=text, pooled=())
    torch.testing.assert_close(
        dual_prompt_cost_volume(image, same, model.config),
        cosine_cost_volume(image, text, per_image=True),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize(
    ("prompt_mode", "cost_fusion"),
    [
        ("avg", "avg_emb"),
        ("text", "avg_emb"),
        ("visual", "avg_emb"),
        ("avg", "avg_cos"),
        ("avg", "cat"),
    ],
)
def test_table_2_switches_compute_their_cost_volumes(model, monkeypatch, prompt_mode, cost_fusion):
    """Table 2a (R = T, V or their mean) and 2b (mean of the two cost volumes, or both)."""
    monkeypatch.setattr(
        model, "config", model.config.replace(prompt_mode=prompt_mode, cost_fusion=cost_fusion)
    )
    generator = torch.Generator().manual_seed(9)
    dim = model.backbone.embed_dim
    image = torch.randn(1, dim, 3, 4, generator=generator)
    text = torch.randn(1, 3, 4, dim, generator=generator)
    visual = torch.randn(1, 3, 4, dim, generator=generator)
    pixels = F.normalize(image, dim=1)

    def cosine(prompts):
        return torch.einsum("bdhw,bkmd->bkmhw", pixels, F.normalize(prompts, dim=-1))

    expected = {
        ("avg", "avg_emb"): cosine(F.normalize(text, dim=-1) + F.normalize(visual, dim=-1)),
        ("text", "avg_emb"): cosine(text),
        ("visual", "avg_emb"): cosine(visual),
        ("avg", "avg_cos"): (cosine(text) + cosine(visual)) / 2,
        ("avg", "cat"): torch.cat([cosine(text), cosine(visual)], dim=2),
    }[(prompt_mode, cost_fusion)]
    cost = dual_prompt_cost_volume(
        image, DualPrompts(text=text, visual=visual, pooled=()), model.config
    )
    torch.testing.assert_close(cost, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ 3. F_v^j (Eq. 2)


def test_folded_visual_cost_projection_matches_the_naive_path(monkeypatch):
    torch.manual_seed(2)
    layer = VisualCostProjection(num_prompts=5, out_channels=3)
    image = torch.randn(2, 6, 7, 9)
    prototypes = torch.randn(2, 3, 5, 6)
    cost = layer.visual_cost_volume(image, prototypes)
    assert cost.shape == (2, 3, 5, 7, 9)
    naive = layer.naive(image, prototypes)
    assert naive.shape == (2, 3, 3, 7, 9)

    def unbuilt(*args, **kwargs):
        raise AssertionError("the folded projection builds no cost volume")

    # M = 5, g = 3, D = 6: folding is cheaper, so forward never builds F_v^j.
    monkeypatch.setattr("ovseg.methods.blocks.cosine_cost_volume", unbuilt)
    torch.testing.assert_close(layer(image, prototypes), naive, atol=1e-4, rtol=0)
    shared = prototypes[:1].expand(2, -1, -1, -1)
    torch.testing.assert_close(layer(image, shared), layer.naive(image, shared), atol=1e-4, rtol=0)
    # Borders: a constant image gives border outputs that differ from the interior.
    flat = layer(torch.ones(1, 6, 5, 5), prototypes[:1])
    torch.testing.assert_close(
        flat, layer.naive(torch.ones(1, 6, 5, 5), prototypes[:1]), atol=1e-4, rtol=0
    )


def test_visual_cost_volumes_have_the_stage_resolution(model, features):
    prompts = model.dual_prompts(VOCABULARY, 1)
    for j, encoder_features, pooled in zip(
        (2, 3, 4), features.guidance, prompts.pooled, strict=True
    ):
        cost = VisualCostProjection.visual_cost_volume(encoder_features, pooled)
        assert cost.shape == (1, 4, 4, SIZE // 2**j, SIZE // 2**j)


def test_pooled_prompt_features_are_stage_means_of_the_frozen_copy(model):
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        embedding, pooled = model.encode_prompt_images(images)
        reference = model.backbone.encode_image(model.backbone.normalize(images), layers=(0, 1, 2))
    torch.testing.assert_close(embedding, reference.global_embedding, atol=1e-5, rtol=1e-5)
    for level, stride in zip(pooled, (4, 8, 16), strict=True):
        expected = reference.intermediates[f"stride{stride}"].mean(dim=(2, 3))
        torch.testing.assert_close(level, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scales", [(2, 3, 4), (2,)])
def test_each_visual_cost_volume_guides_the_decoder(backbone, cache_dir, scales):
    """Changing V̄_j changes the logits exactly for the scales j that feed F_v^j (Table 3)."""
    torch.manual_seed(10)
    method = DPSeg(
        config=small_config(cache_dir, input_size=64, visual_cost_scales=scales),
        backbone=backbone,
    ).eval()
    with torch.no_grad():
        features = method.encode_image(torch.rand(1, 3, 64, 64))
        prompts = method.dual_prompts(VOCABULARY, 1)
        logits = method.decode(features, prompts)
        for index, j in enumerate((2, 3, 4)):
            pooled = list(prompts.pooled)
            pooled[index] = pooled[index].roll(1, dims=1)  # every class gets another's V̄_j
            changed = method.decode(features, dataclasses.replace(prompts, pooled=tuple(pooled)))
            difference = (changed - logits).abs().max()
            assert (difference > 1e-3) == (j in scales), (j, difference)


# ---------------------------------------------------------------------- 4. cost embedding


def test_cost_embedding_is_one_7x7_conv_from_m_to_128_shared_by_classes(backbone, cache_dir):
    method = DPSeg(config=small_config(cache_dir, templates="imagenet"), backbone=backbone)
    conv = method.cost_embedding.conv
    assert (conv.in_channels, conv.out_channels) == (80, 128)
    assert conv.kernel_size == (7, 7) and conv.padding == (3, 3)
    slice_ = torch.randn(1, 1, 80, 5, 5)
    embedded = method.cost_embedding(torch.cat([slice_, torch.randn(1, 1, 80, 5, 5), slice_], 1))
    assert embedded.shape == (1, 3, 128, 5, 5)
    torch.testing.assert_close(embedded[:, 0], embedded[:, 2])


# ------------------------------------------------------------------------------ 5. decoder


def test_decoder_stage_shapes(model, features):
    prompts = model.dual_prompts(VOCABULARY, 1)
    with torch.no_grad():
        logits, shapes = decoded_shapes(model, features, prompts)
    assert features.embeddings.shape == (1, 128, SIZE // 32, SIZE // 32)
    assert shapes["F_c"] == (1, 4, 4, SIZE // 32, SIZE // 32)
    assert shapes["D1"] == (1, 4, 64, SIZE // 16, SIZE // 16)
    assert shapes["D2"] == (1, 4, 32, SIZE // 8, SIZE // 8)
    assert shapes["D3"] == (1, 4, 16, SIZE // 4, SIZE // 4)
    assert logits.shape == (1, 4, SIZE // 4, SIZE // 4)
    for stage, width in zip(model.decoder.stages, (128, 64, 32), strict=True):
        branches = stage.hd_conv.branches
        assert [b.dilation for b in branches] == [(1, 1), (2, 2), (4, 4)]
        assert all(b.kernel_size == (3, 3) and b.groups == width for b in branches)


def test_hd_conv_receptive_field_is_exactly_9x9():
    torch.manual_seed(3)
    block = HybridDilatedConv(channels=2)
    x = torch.randn(1, 2, 21, 21, requires_grad=True)
    block(x)[0, 0, 10, 10].backward()
    support = x.grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = torch.nonzero(support, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 14, 6, 14)
    offsets = {(d * i, d * j) for d in (1, 2, 4) for i in (-1, 0, 1) for j in (-1, 0, 1)}
    assert {(int(r) - 10, int(c) - 10) for r, c in zip(rows, cols, strict=True)} == offsets


# --------------------------------------------------------------- 6. class-permutation equivariance


def test_permuting_the_classes_permutes_the_logits(model, features):
    prompts = model.dual_prompts(VOCABULARY, 1)
    order = [2, 0, 3, 1]
    permuted = DualPrompts(
        text=prompts.text[:, order],
        visual=prompts.visual[:, order],
        pooled=tuple(p[:, order] for p in prompts.pooled),
    )
    with torch.no_grad():
        logits = model.decode(features, prompts)
        torch.testing.assert_close(
            model.decode(features, permuted), logits[:, order], atol=1e-5, rtol=0
        )
        vocabulary = [VOCABULARY[i] for i in order]
        first = model.segment(features, VOCABULARY, head=True, inference="II").logits
        again = model.segment(features, vocabulary, head=True, inference="II").logits
    torch.testing.assert_close(again, first[:, order], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention_type", ["linear", "full"])
def test_class_attention_lets_each_class_see_the_others(backbone, cache_dir, attention_type):
    """The class attention is the decoder's only path between classes: other classes' prompts
    change a class's logits, and do not once it is removed."""
    torch.manual_seed(11)
    method = DPSeg(
        config=small_config(cache_dir, input_size=64, attention_type=attention_type),
        backbone=backbone,
    ).eval()
    with torch.no_grad():
        features = method.encode_image(torch.rand(1, 3, 64, 64))
        prompts = method.dual_prompts(VOCABULARY, 1)
        others = prompts.classes(slice(1, None))
        replaced = DualPrompts(  # class 3 takes class 1's prompts; classes 0-2 are unchanged
            text=torch.cat([prompts.text[:, :3], others.text[:, :1]], dim=1),
            visual=torch.cat([prompts.visual[:, :3], others.visual[:, :1]], dim=1),
            pooled=tuple(torch.cat([p[:, :3], p[:, 1:2]], dim=1) for p in prompts.pooled),
        )
        logits = method.decode(features, prompts)
        changed = method.decode(features, replaced)
        assert (changed[:, :3] - logits[:, :3]).abs().max() > 1e-3
        for stage in method.decoder.stages:  # the attended tokens add nothing
            stage.class_attention.mix = lambda tokens: torch.zeros_like(tokens)
        without = method.decode(features, prompts)
        torch.testing.assert_close(
            method.decode(features, replaced)[:, :3], without[:, :3], atol=1e-6, rtol=0
        )


def test_chunking_over_classes_does_not_change_the_result(model, features, monkeypatch):
    with torch.no_grad():
        whole = model.segment(features, VOCABULARY, head=True, inference="I").logits
        monkeypatch.setattr(model, "config", model.config.replace(class_chunk=1))
        chunked = model.segment(features, VOCABULARY, head=True, inference="I").logits
        single = model.segment(features, ["cat"], head=True, inference="II").logits
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    assert single.shape == (1, 1, SIZE, SIZE)


# ---------------------------------------------------- 7.-8. stop-gradient, freezing, optimiser


def test_training_step_trains_only_the_image_encoder_and_the_head(toy_convnext, cache_dir):
    backbone = copy.deepcopy(toy_convnext)
    torch.manual_seed(4)
    method = DPSeg(config=small_config(cache_dir), backbone=backbone)
    images = torch.rand(2, 3, SIZE, SIZE)
    target = torch.randint(0, 4, (2, SIZE, SIZE))
    target[:, :8] = 255
    # A prediction in inference mode first: its cached prompts must not break training.
    with torch.inference_mode():
        method.eval().segment(method.encode_image(images[:1]), VOCABULARY, head=True)
    method.train()

    features = method.encode_image(images)
    for encoder_features in features.guidance:
        assert not encoder_features.requires_grad and encoder_features.grad_fn is None
    assert features.embeddings.grad_fn is not None

    frozen = {
        name: p.detach().clone()
        for name, p in itertools.chain(
            ((n, p) for n, p in backbone.model.named_parameters() if not n.startswith("visual.")),
            (("prompt." + n, p) for n, p in method.prompt_encoder.named_parameters()),
        )
    }
    encoder_before = [p.detach().clone() for p in backbone.model.visual.parameters()]
    head_before = [p.detach().clone() for p in method.decoder.parameters()]
    groups = method.parameter_groups(TRAINING_RECIPE["base_lr"])
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("head", 2e-4, 1e-4),
        ("image_encoder", pytest.approx(2e-6), 1e-4),
    ]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in method.parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(groups)

    output = method(images, VOCABULARY, target=target)
    assert output.intermediates["inference"] == "I"
    losses = method.loss(output, target)
    losses["loss_bce"].backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.model.visual.parameters()
    )
    optimizer.step()

    for name, p in itertools.chain(
        ((n, p) for n, p in backbone.model.named_parameters() if not n.startswith("visual.")),
        (("prompt." + n, p) for n, p in method.prompt_encoder.named_parameters()),
    ):
        assert torch.equal(p, frozen[name]) and not p.requires_grad, name
    assert any(
        not torch.equal(p, q)
        for p, q in zip(backbone.model.visual.parameters(), encoder_before, strict=True)
    )
    assert any(
        not torch.equal(p, q) for p, q in zip(method.decoder.parameters(), head_before, strict=True)
    )


@pytest.mark.parametrize("name", ["dpseg-convnext-b-768", "dpseg-convnext-l-768"])
def test_the_paper_configs_train_with_the_papers_recipe(name):
    """§5: what the trainer reads from the paper configs is the recipe DPSeg states."""
    from training.train import TrainConfig

    config = TrainConfig.from_file(PAPER_CONFIGS / f"{name}.json", [])
    recipe = TRAINING_RECIPE
    assert config.base_lr == recipe["base_lr"] and config.weight_decay == recipe["weight_decay"]
    assert (config.schedule, config.warmup, config.grad_clip) == (
        recipe["schedule"],
        recipe["warmup"],
        recipe["grad_clip"],
    )
    assert config.iterations == recipe["iterations"]
    assert config.dataset["crop_size"] == config.method_config["input_size"] == recipe["crop_size"]
    assert config.batch_size * 2 == recipe["batch_size"]  # per GPU, on the paper's two V100s
    settings = DPSegConfig().replace(**config.method_config)
    assert settings.encoder_lr_multiplier == recipe["encoder_lr_multiplier"]
    assert settings.weight_decay == recipe["weight_decay"]


# -------------------------------------------------------------------------------- 9. loss


def test_loss_is_per_pixel_binary_cross_entropy_with_the_ignore_policy(model, monkeypatch):
    target = torch.randint(0, 3, (2, 6, 5))
    target[0, :2] = 255
    valid = target != 255
    one_hot = F.one_hot(torch.where(valid, target, 0), 3).permute(0, 3, 1, 2).bool()
    one_hot &= valid[:, None]
    perfect = torch.where(one_hot, 20.0, -20.0)
    assert model.loss(SegmentationOutput(logits=perfect), target)["loss_bce"] < 1e-6

    logits = torch.randn(2, 3, 6, 5)
    per_element = F.binary_cross_entropy_with_logits(logits, one_hot.float(), reduction="none")
    output = SegmentationOutput(logits=logits)
    torch.testing.assert_close(model.loss(output, target)["loss_bce"], per_element.mean())
    monkeypatch.setattr(model, "config", model.config.replace(ignore_policy="exclude"))
    expected = per_element.permute(0, 2, 3, 1)[valid].mean()
    torch.testing.assert_close(model.loss(output, target)["loss_bce"], expected)
    with pytest.raises(ValueError, match="below K = 3"):
        model.loss(output, torch.full((2, 6, 5), 3))


# --------------------------------------------------------------------- 10. Inference II


def test_inference_ii_without_detections_reproduces_pass_one(model, features):
    with torch.no_grad():
        output = model.segment(
            features,
            VOCABULARY,
            head=True,
            inference="II",
            detection_threshold=1.0,
            return_intermediates=True,
        )
    assert output.intermediates["detected_classes"] == [[]]
    assert torch.equal(output.intermediates["pass1_logits"], output.intermediates["pass2_logits"])
    assert torch.equal(output.logits, output.intermediates["pass1_logits"])


def _expected_crop(model, image, label_map, k, mode="masked"):
    """Class k's Inference II crop, cut here from the label map (not by refine_prompts)."""
    fill = model.backbone.image_mean.view(3)
    return crop_class_region(image, label_map == k, size=64, fill=fill, mode=mode)


# Class 2 fills the right half, class 3 a tall narrow box on the left, class 0 the rest: a
# transposed mask would crop other pixels.
def _label_map():
    label_map = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    label_map[:, :, SIZE // 2 :] = 2
    label_map[:, 10:40, 5:9] = 3
    return label_map


@pytest.mark.parametrize("crop_mode", ["masked", "bbox"])
def test_inference_ii_replaces_only_the_visual_prompts_of_detected_classes(
    model, features, crop_mode
):
    """§4.3: a detected class's crop replaces its visual prompt V for all M templates; an
    undetected class keeps its prompt; T and the decoder's V̄_j stay as they were."""
    prompts = model.dual_prompts(VOCABULARY, 1)
    label_map = _label_map()
    refined, detected, crops = model.refine_prompts(
        features, prompts, label_map, crop_mode=crop_mode
    )
    assert detected == [[0, 2, 3]] and set(crops[0]) == {0, 2, 3}
    assert torch.equal(refined.text, prompts.text)
    assert torch.equal(refined.visual[:, 1], prompts.visual[:, 1])
    for level, original in zip(refined.pooled, prompts.pooled, strict=True):
        assert torch.equal(level, original)
    for k in (0, 2, 3):
        expected = _expected_crop(model, features.images[0], label_map[0], k, crop_mode)
        assert torch.equal(crops[0][k], expected)
        embedding, _ = model.encode_prompt_images(expected[None])
        torch.testing.assert_close(refined.visual[0, k], embedding.expand(4, -1))
        assert not torch.equal(refined.visual[0, k], prompts.visual[0, k])
    other = "bbox" if crop_mode == "masked" else "masked"
    assert not torch.equal(  # class 0's box holds class 3
        crops[0][0], _expected_crop(model, features.images[0], label_map[0], 0, other)
    )


def test_refining_the_stage_features_too_is_an_option(model, features):
    """The spec's reading (an ablation): the crops replace V̄_j of detected classes as well."""
    prompts = model.dual_prompts(VOCABULARY, 1)
    label_map = _label_map()
    refined, _, crops = model.refine_prompts(
        features, prompts, label_map, refine_stage_features=True
    )
    for k in (0, 2, 3):
        _, pooled = model.encode_prompt_images(crops[0][k][None])
        for level, expected in zip(refined.pooled, pooled, strict=True):
            torch.testing.assert_close(level[0, k], expected.expand(4, -1))
    for level, original in zip(refined.pooled, prompts.pooled, strict=True):
        assert torch.equal(level[:, 1], original[:, 1])
        assert not torch.equal(level[:, 0], original[:, 0])


@pytest.mark.parametrize(
    ("given", "crop_mode"),
    [({}, "masked"), ({"crop_mode": "bbox"}, "bbox"), ({"config": "bbox"}, "bbox")],
)
def test_pass_two_reruns_the_head_on_the_crops_of_pass_one(
    model, features, monkeypatch, given, crop_mode
):
    """Pass II = the head on pass I's prompts with V of each detected class replaced by the
    embedding of its crop (cut in ``crop_mode`` from pass I's argmax), V̄_j kept."""
    given = dict(given)
    if "config" in given:
        monkeypatch.setattr(model, "config", model.config.replace(crop_mode=given.pop("config")))
    with torch.no_grad():
        output = model.segment(
            features, VOCABULARY, head=True, inference="II", return_intermediates=True, **given
        )
        labels = output.intermediates["pass1_logits"].argmax(dim=1)[0]
        detected = output.intermediates["detected_classes"][0]
        assert detected == sorted(set(labels.unique().tolist()))
        crops = [_expected_crop(model, features.images[0], labels, k, crop_mode) for k in detected]
        embedding, _ = model.encode_prompt_images(torch.stack(crops))
        prompts = model.dual_prompts(VOCABULARY, 1)
        visual = prompts.visual.clone()
        visual[0, detected] = embedding[:, None]
        refined = DualPrompts(text=prompts.text, visual=visual, pooled=prompts.pooled)
        expected = upsample_logits(model._pass(features, refined, True), (SIZE, SIZE))
    torch.testing.assert_close(output.logits, expected, atol=1e-5, rtol=0)
    assert not torch.equal(output.logits, output.intermediates["pass1_logits"])
    shown = output.intermediates["refined_prompt_images"][0]
    assert list(shown) == detected
    for k, crop in zip(detected, crops, strict=True):
        assert torch.equal(shown[k], crop)
    # The other crop mode would have given other prompts: the setting is not ignored.
    other = "bbox" if crop_mode == "masked" else "masked"
    assert any(
        not torch.equal(crop, _expected_crop(model, features.images[0], labels, k, other))
        for k, crop in zip(detected, crops, strict=True)
    )


def test_inference_ii_runs_the_image_encoder_once(model, images):
    model.visual_prompts(VOCABULARY)  # a warm prompt bank
    counts = {"image": 0, "prompt": 0}

    def counter(name):
        def hook(module, inputs, output):
            counts[name] += inputs[0].shape[0]

        return hook

    handles = [
        model.backbone.model.visual.trunk.stem.register_forward_hook(counter("image")),
        model.prompt_encoder.trunk.stem.register_forward_hook(counter("prompt")),
    ]
    try:
        with torch.no_grad():
            output = model(images[:1], VOCABULARY, head=True, inference="II")
    finally:
        for handle in handles:
            handle.remove()
    assert counts["image"] == 1
    assert counts["prompt"] == len(output.intermediates["detected_classes"][0]) > 0


# ------------------------------------------------------------------ 11. batch consistency


def test_a_batch_gives_the_same_result_as_single_images(model, images):
    with torch.no_grad():
        batch = model(images, VOCABULARY, head=True, inference="II")
        singles = [model(images[i : i + 1], VOCABULARY, head=True, inference="II") for i in (0, 1)]
    for index, single in enumerate(singles):
        torch.testing.assert_close(batch.logits[index], single.logits[0], atol=1e-5, rtol=0)
        assert (
            batch.intermediates["detected_classes"][index]
            == single.intermediates["detected_classes"][0]
        )


# ---------------------------------------------------------------------- 13. ablation switches


@pytest.mark.parametrize(
    "changes",
    [
        {"prompt_mode": "text"},
        {"prompt_mode": "visual"},
        {"cost_fusion": "avg_cos"},
        {"cost_fusion": "cat"},
        {"visual_cost_scales": (2,)},
        {"visual_cost_scales": (2, 3)},
        {"visual_cost_scales": (), "upsampled_cost_guidance": True},
        {"num_templates": 2},
        {"attention_type": "full"},
        {"prompt_noise": 0.6},
    ],
)
def test_every_ablation_switch_builds_and_runs(backbone, cache_dir, changes):
    torch.manual_seed(6)
    method = DPSeg(config=small_config(cache_dir, input_size=64, **changes), backbone=backbone)
    templates = changes.get("num_templates", 4)
    with torch.no_grad():
        features = method.eval().encode_image(torch.rand(1, 3, 64, 64))
        output = method.segment(features, VOCABULARY, head=True, inference="II")
    assert output.logits.shape == (1, 4, 64, 64) and torch.isfinite(output.logits).all()
    cost_channels = 2 * templates if changes.get("cost_fusion") == "cat" else templates
    assert method.cost_embedding.conv.in_channels == cost_channels
    scales = changes.get("visual_cost_scales", (2, 3, 4))
    for stage, scale in zip(method.decoder.stages, (4, 3, 2), strict=True):
        assert (stage.visual_cost is not None) == (scale in scales)
    if changes.get("upsampled_cost_guidance"):
        # Table 3's last row: F_c upsampled by deconvolutions fills the F_v^j slots.
        assert [s.fuse[0].in_channels for s in method.decoder.stages] == [160, 80, 40]
        assert method.decoder.cost_upsampling[0][0].in_channels == templates
    if "prompt_noise" in changes:
        assert method.prompt_bank.generator.id.endswith("noise=0.6")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt_mode": "text", "cost_fusion": "cat"}, "needs prompt_mode='avg'"),
        ({"decoder_dims": (62, 32, 16)}, "62"),
        ({"visual_cost_scales": (5,)}, "subset"),
        ({"prompt_generator": "layerdiffuse"}, "LayerDiffuse"),
        ({"num_templates": 5}, "num_templates"),
        ({"inference": "III"}, "inference"),
    ],
)
def test_invalid_settings_are_clear_errors(backbone, cache_dir, changes, message):
    with pytest.raises(ValueError, match=message):
        DPSeg(config=small_config(cache_dir, **changes), backbone=backbone)


# -------------------------------------------------------------- 14. paper-number consistency


def test_paper_numbers_are_consistent():
    ours = PAPER_RESULTS["convnext-b/inference-I"]
    assert ours == (12.0, 19.5, 32.9, 58.1, 96.0)
    rows = {(table, row): numbers for table, row, _, numbers in PAPER_ABLATIONS}
    for key in [("2a", "Avg(T, V)"), ("2b", "cos(Avg(T,V), E)"), ("3", "F_c, F_v^{2,3,4}")]:
        assert rows[key] == ours
    assert rows[("4", "80 templates")] == rows[("5", "SD-V1.5")] == ours
    assert rows[("5", "SED (text prompt only)")] == PAPER_RESULTS["sed/convnext-b"]
    for size, mean_gain in (("b", 0.54), ("l", 0.70)):
        first = PAPER_RESULTS[f"convnext-{size}/inference-I"]
        second = PAPER_RESULTS[f"convnext-{size}/inference-II"]
        gains = [b - a for a, b in zip(first, second, strict=True)]
        assert np.mean(gains) == pytest.approx(mean_gain, abs=1e-9)
    fields = set(DPSegConfig.__dataclass_fields__)
    assert all(set(changes) <= fields for _, _, changes, _ in PAPER_ABLATIONS)


# ---------------------------------------------- training-free path, intermediates, builder


def test_an_untrained_head_runs_the_training_free_path(
    backbone, cache_dir, features, monkeypatch, tmp_path
):
    monkeypatch.setattr(backbone_registry, "ASSETS_DIR", tmp_path)
    settings = {k: v for k, v in vars(small_config(cache_dir)).items() if k != "backbone"}
    method = build_dpseg(backbone=backbone, **settings).eval()
    assert not method.trained_head and method.backbone is backbone
    with torch.no_grad():
        first = method.segment(features, VOCABULARY, inference="I", return_intermediates=True)
        second = method.segment(features, VOCABULARY, return_intermediates=True)
    assert first.intermediates["head"] == "training-free"
    dual_cost = dpseg_cost_volumes(first.intermediates)["dual"]
    expected = upsample_logits(dual_cost / 0.01, (SIZE, SIZE))
    torch.testing.assert_close(first.logits, expected, atol=1e-4, rtol=0)
    assert second.intermediates["inference"] == "II"
    assert torch.equal(second.intermediates["pass1_logits"], first.logits)
    assert second.intermediates["detected_classes"][0]
    assert not torch.equal(second.logits, first.logits)


def test_intermediates_for_the_demo(model, features):
    with torch.no_grad():
        output = model.segment(
            features, VOCABULARY, head=True, inference="II", return_intermediates=True
        )
    found = output.intermediates
    h = SIZE // 32
    costs = dpseg_cost_volumes(found)
    for name in ("text", "visual", "dual"):
        assert costs[name].shape == (1, 4, h, h)
    prompts = model.dual_prompts(VOCABULARY, 1)
    text_cost = cosine_cost_volume(features.embeddings, prompts.text, per_image=True).mean(dim=2)
    torch.testing.assert_close(costs["text"], text_cost, atol=1e-5, rtol=0)
    visual_cost = cosine_cost_volume(features.embeddings, prompts.visual, per_image=True)
    torch.testing.assert_close(costs["visual"], visual_cost.mean(dim=2), atol=1e-5, rtol=0)
    gallery = found["visual_prompt_images"]
    assert isinstance(gallery, PromptGallery) and len(gallery) == 4
    bank_images = model.prompt_bank.images(VOCABULARY, TEMPLATES, 2)
    for image, expected in zip(gallery[1], bank_images[1], strict=True):
        np.testing.assert_array_equal(image, expected)
    crops = found["refined_prompt_images"][0]
    assert set(crops) == set(found["detected_classes"][0])
    assert all(c.dtype == torch.float32 and c.shape == (3, 64, 64) for c in crops.values())
    assert found["pass2_logits"] is output.logits


def test_saved_weights_load_into_a_copy_of_a_shared_backbone(
    model, backbone, cache_dir, features, tmp_path
):
    path = save_weights(model, tmp_path / "dpseg")
    before = [p.detach().clone() for p in backbone.parameters()]
    loaded = build_dpseg(backbone=backbone, weights=str(path), prompt_cache_dir=str(cache_dir))
    assert loaded.trained_head and loaded.backbone is not backbone
    assert loaded.templates == TEMPLATES  # the architecture comes from the saved record
    assert all(torch.equal(p, q) for p, q in zip(backbone.parameters(), before, strict=True))
    with torch.no_grad():
        expected = model.segment(features, VOCABULARY, head=True, inference="II").logits
        output = loaded.eval().segment(features, VOCABULARY, return_intermediates=True)
    assert output.intermediates["head"] == "trained"
    torch.testing.assert_close(output.logits, expected, atol=1e-6, rtol=0)
    with pytest.raises(WeightsError):
        build_dpseg(backbone=backbone, weights=str(tmp_path / "missing.safetensors"))


def test_the_shipped_toy_head_is_found_by_default(
    model, backbone, cache_dir, monkeypatch, tmp_path
):
    monkeypatch.setattr(backbone_registry, "ASSETS_DIR", tmp_path)
    save_weights(model, tmp_path / "dpseg-toy")
    method = build_dpseg(backbone=backbone, prompt_cache_dir=str(cache_dir))
    assert not method.trained_head  # a random toy CLIP is not the one the head was trained on
    monkeypatch.setattr(backbone, "name", f"local-dir:{tmp_path / 'clip-toy-convnext'}")
    method = build_dpseg(backbone=backbone, prompt_cache_dir=str(cache_dir))
    assert method.trained_head and "dpseg" in METHODS


def test_predictor_end_to_end(model):
    predictor = ovseg.Predictor(model)
    predictor.set_image(np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    prediction = predictor.predict(["sky", "grass", "cat"], options={"dpseg": {"head": True}})
    assert prediction["dpseg"].label_map.shape == (100, 120)


@pytest.mark.parametrize(("field", "value"), [("seed", 1), ("resolution", 32)])
def test_remembered_prompts_follow_the_banks_seed_and_resolution(model, monkeypatch, field, value):
    """The bank's seed picks the images and its resolution is what they are encoded at: a
    changed bank gives its own prompts, not the ones remembered from before."""
    before = model.visual_prompts(VOCABULARY).embeddings
    monkeypatch.setattr(model.prompt_bank, field, value)
    after = model.visual_prompts(VOCABULARY).embeddings
    expected = model.prompt_bank.embeddings(VOCABULARY, model.templates, 2).embeddings
    assert torch.equal(after, expected) and not torch.equal(after, before)
    monkeypatch.undo()
    assert torch.equal(model.visual_prompts(VOCABULARY).embeddings, before)


def test_the_diffusers_dtype_is_a_setting_and_part_of_the_bank_keys(backbone, cache_dir):
    """A CPU reads a bank drawn in float16 on a GPU by asking for float16 (nothing is loaded)."""
    banks = {
        dtype: DPSeg(
            config=small_config(cache_dir, prompt_generator="sd15", prompt_dtype=dtype),
            backbone=backbone,
        ).prompt_bank
        for dtype in ("float16", "float32")
    }
    assert banks["float16"].generator.dtype == torch.float16
    assert banks["float16"].generator._pipeline is None
    entry = banks["float16"].entries(["cat"], TEMPLATES)[0][0]
    assert banks["float16"].image_path(entry) != banks["float32"].image_path(entry)
    with pytest.raises(ValueError, match="prompt_dtype"):
        DPSeg(config=small_config(cache_dir, prompt_dtype="half"), backbone=backbone)


def test_inference_ii_keeps_pass_one_logits_only_when_intermediates_are_asked(model, features):
    with torch.no_grad():
        plain = model.segment(features, VOCABULARY, head=True, inference="II")
        full = model.segment(
            features, VOCABULARY, head=True, inference="II", return_intermediates=True
        )
    assert "pass1_logits" not in plain.intermediates
    assert plain.intermediates["detected_classes"] == full.intermediates["detected_classes"]
    torch.testing.assert_close(plain.logits, full.logits)
    assert full.intermediates["pass2_logits"] is full.logits


# ------------------------------------------------------ streamed inference (issue 10: memory)

WIDE_VOCABULARY = [*VOCABULARY, "car", "tree", "road"]  # 7 classes: chunks of 3 leave one over


def _reference_and_streamed(method, run):
    """``run()`` with autograd (the chunks of classes concatenated, as in training) and without
    (the chunks written into one buffer), both detached."""
    with torch.enable_grad():
        reference = run()
    with torch.no_grad():
        streamed = run()
    return reference, streamed


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"class_chunk": 3},
        {"class_chunk": 1, "attention_type": "full"},
        {
            "class_chunk": 2,
            "cost_fusion": "cat",
            "visual_cost_scales": (),
            "upsampled_cost_guidance": True,
        },
    ],
)
def test_streamed_decoder_matches_the_reference_bit_for_bit(
    backbone, cache_dir, images, monkeypatch, changes
):
    torch.manual_seed(7)
    method = DPSeg(config=small_config(cache_dir, **changes), backbone=backbone).eval()
    # A few pooled positions per attention chunk, so the class attention runs in pieces too.
    monkeypatch.setattr("ovseg.methods.dpseg.ATTENTION_TOKENS", 5 * len(WIDE_VOCABULARY))
    with torch.no_grad():
        features = method.encode_image(images)
    prompts = method.dual_prompts(WIDE_VOCABULARY, 2)

    def decode():
        logits, shapes = decoded_shapes(method, features, prompts)
        return logits.detach(), shapes

    (reference, shapes), (streamed, streamed_shapes) = _reference_and_streamed(method, decode)
    assert streamed.shape == (2, 7, SIZE // 4, SIZE // 4)
    assert torch.equal(streamed, reference)
    assert streamed_shapes == shapes and shapes["D3"] == (2, 7, 16, SIZE // 4, SIZE // 4)


def test_streamed_inference_ii_matches_the_reference_path(model, images, monkeypatch):
    monkeypatch.setattr(model, "config", model.config.replace(class_chunk=3))
    with torch.no_grad():
        features = model.encode_image(images)
    results = {}
    for head in (True, False):  # the trained head and the training-free path

        def segment(head=head):
            return model.segment(features, WIDE_VOCABULARY, head=head, inference="II")

        reference, results[head] = _reference_and_streamed(model, segment)
        assert torch.equal(results[head].logits, reference.logits.detach())
        detected = results[head].intermediates["detected_classes"]
        assert detected == reference.intermediates["detected_classes"] and detected[0]
    with torch.no_grad():  # pass I kept in full for the intermediates
        kept = model.segment(
            features, WIDE_VOCABULARY, head=True, inference="II", return_intermediates=True
        )
    assert torch.equal(kept.logits, results[True].logits)


def test_streamed_inference_builds_full_resolution_logits_once(model, images, monkeypatch):
    """No B×K×… tensor of B×K×H×W floats (the full-resolution logits, or D3's B×K×16×H/4×W/4)
    exists during Inference II but the output, with autograd or without: pass I's label map comes
    from chunks of classes, and its logits are built only when asked for as an intermediate."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(model, "config", model.config.replace(class_chunk=2))
    monkeypatch.setattr("ovseg.methods.chunking.UPSAMPLE_CHUNK", 2)
    with torch.no_grad():
        features = model.encode_image(images)
    model.visual_prompts(WIDE_VOCABULARY)  # a warm prompt bank
    full = 2 * len(WIDE_VOCABULARY) * SIZE * SIZE

    class LargeTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for tensor in result if isinstance(result, tuple | list) else [result]:
                if (
                    isinstance(tensor, torch.Tensor)
                    and tuple(tensor.shape[:2]) == (2, len(WIDE_VOCABULARY))  # B×K×…
                    and tensor.numel() >= full
                ):
                    self.storages.add(tensor.untyped_storage().data_ptr())
            return result

    def large_tensors(grad: bool, **options) -> int:
        with torch.set_grad_enabled(grad), LargeTensors() as mode:
            output = model.segment(features, WIDE_VOCABULARY, head=True, inference="II", **options)
        assert output.logits.numel() == full and output.intermediates["detected_classes"][0]
        return len(mode.storages)

    assert large_tensors(grad=False) == 1
    assert large_tensors(grad=True) == 1
    assert large_tensors(grad=False, return_intermediates=True) == 2  # and pass I's logits


def test_refinement_encodes_the_crops_per_encoder_batch(model, images, monkeypatch):
    monkeypatch.setattr("ovseg.methods.dpseg.PROMPT_ENCODER_BATCH", 2)
    with torch.no_grad():
        features = model.encode_image(images)
    prompts = model.dual_prompts(WIDE_VOCABULARY, 2)
    stripes = torch.arange(SIZE) * 7 // SIZE  # classes 0-6 across the image
    # Image 0: seven columns of classes; image 1: five rows (0-4): 12 crops, 6 encoder batches.
    label_map = torch.stack([stripes.expand(SIZE, SIZE), (stripes % 5)[:, None].expand(SIZE, SIZE)])
    refined, detected, crops = model.refine_prompts(
        features, prompts, label_map, refine_stage_features=True
    )
    owners = [(b, k) for b, classes in enumerate(detected) for k in classes]
    assert len(owners) == 12
    embedding, pooled = model.encode_prompt_images(torch.stack([crops[b][k] for b, k in owners]))
    for (b, k), row in zip(owners, embedding, strict=True):
        assert torch.equal(refined.visual[b, k], row.expand(4, -1))
    for level, expected in zip(refined.pooled, pooled, strict=True):
        assert torch.equal(level[[b for b, _ in owners], [k for _, k in owners], 0], expected)
