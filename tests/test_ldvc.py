"""LDVC: the spec's acceptance checks (specs/ldvc.md §9) on random toy CLIPs, plus one real-scale
shape and parameter-budget check on a random ViT-B/16."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovseg.backbones import ASSETS_DIR, WeightsError, load_backbone
from ovseg.backbones.clip import drop_path
from ovseg.errors import UntrainedHeadError
from ovseg.methods import losses
from ovseg.methods.base import IGNORE_INDEX
from ovseg.methods.ldvc import (
    Ldvc,
    LdvcConfig,
    LdvcOutput,
    RouteAttention,
    build_ldvc,
)
from ovseg.methods.losses import focal_dice_loss
from ovseg.methods.weights import save_weights

REPO = Path(__file__).resolve().parents[1]
TOY = {"input_size": 64, "visual_prompt_tokens": 4, "top_m": 2, "heads": 4}


@pytest.fixture(scope="module")
def clip():
    return load_backbone("toy-vit", "random")


@pytest.fixture(scope="module")
def model(clip):
    torch.manual_seed(0)
    method = build_ldvc(backbone=clip, **TOY)
    method.trained_head = True
    return method.eval()


def images(seed: int, batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- LCSA


def attention_layer(top_m: int, route: bool = True) -> RouteAttention:
    torch.manual_seed(1)
    return RouteAttention(dim=32, heads=4, window_size=2, top_m=top_m, route=route, dropout=0.0)


def test_route_attention_with_every_window_equals_plain_multi_head_self_attention():
    layer = attention_layer(top_m=16).eval()  # 8×8 tokens, 2×2 windows → 16 windows
    tokens = torch.randn(2, 8, 8, 32)
    routed, routing = layer(tokens)
    reference = nn.MultiheadAttention(32, 4, batch_first=True)
    reference.in_proj_weight.data.copy_(layer.qkv.weight)
    reference.in_proj_bias.data.copy_(layer.qkv.bias)
    reference.out_proj.weight.data.copy_(layer.output.weight)
    reference.out_proj.bias.data.copy_(layer.output.bias)
    flat = tokens.flatten(1, 2)
    expected = reference(flat, flat, flat, need_weights=False)[0].view(2, 8, 8, 32)
    assert routing.indices.shape == (2, 16, 16)
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)
    layer.route = False
    plain, no_routing = layer(tokens)
    assert no_routing is None
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)


def test_routing_indices_are_the_top_m_of_the_pooled_window_affinity():
    layer = attention_layer(top_m=3)
    tokens = torch.randn(1, 4, 6, 32)  # 2×3 windows
    routing = layer.routing(tokens)
    windows = [
        tokens[0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(4, 32).mean(0)
        for r in range(2)
        for c in range(3)
    ]
    descriptors = torch.stack(windows)  # Eq. 8 by hand
    affinity = descriptors @ descriptors.T  # Eq. 10
    torch.testing.assert_close(routing.affinity[0], affinity, atol=1e-5, rtol=1e-5)
    assert routing.indices.shape == (1, 6, 3) and routing.grid == (2, 3)
    for window in range(6):
        expected = set(affinity[window].argsort(descending=True)[:3].tolist())
        assert set(routing.indices[0, window].tolist()) == expected


def test_each_query_attends_exactly_to_the_tokens_of_its_routed_windows():
    layer = attention_layer(top_m=2).eval()
    tokens = torch.randn(1, 4, 4, 32)  # 2×2 windows of 2×2 tokens
    output, routing = layer(tokens)
    query, key, value = layer.qkv(tokens).chunk(3, dim=-1)
    window = 3  # bottom-right: tokens (2..3, 2..3)
    cols = routing.grid[1]
    members = []
    for chosen in routing.indices[0, window].tolist():
        r, c = divmod(chosen, cols)
        members += [(2 * r + i) * 4 + 2 * c + j for i in range(2) for j in range(2)]
    assert len(members) == 8  # m · n² keys per query
    q = query[0, 2:4, 2:4].reshape(4, 4, 8).transpose(0, 1)  # heads×queries×d
    k = key[0].reshape(16, 4, 8)[members].transpose(0, 1)
    v = value[0].reshape(16, 4, 8)[members].transpose(0, 1)
    attended = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1) @ v  # Eq. 12
    expected = layer.output(attended.transpose(0, 1).reshape(4, 32)).view(2, 2, 32)
    torch.testing.assert_close(output[0, 2:4, 2:4], expected, atol=1e-5, rtol=1e-5)


def test_routing_changes_with_the_image_on_a_row_major_window_grid():
    layer = attention_layer(top_m=2)
    first = layer.routing(torch.randn(1, 8, 8, 32, generator=torch.Generator().manual_seed(0)))
    second = layer.routing(torch.randn(1, 8, 8, 32, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(first.indices, second.indices)
    assert first.grid == (4, 4) and first.indices.shape == (1, 16, 2)
    assert first.affinity.shape == (1, 16, 16)


def test_a_grid_of_partial_windows_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="whole 2×2 windows"):
        attention_layer(top_m=2).routing(torch.randn(1, 5, 4, 32))


# ------------------------------------------------------------------------- model, shapes


def test_forward_shapes_anchors_and_cross_attention_at_toy_scale(model):
    vocabulary = ["cat", "dog", "sky"]
    features = model.encode_image(images(0))
    anchors_seen = []
    hooks = [
        block.register_forward_pre_hook(
            lambda module, args, kwargs: anchors_seen.append(args[2]), with_kwargs=True
        )
        for block in model.blocks
    ]
    try:
        with torch.no_grad():
            output = model.segment(features, vocabulary, return_intermediates=True)
    finally:
        for hook in hooks:
            hook.remove()
    inter = output.intermediates
    assert output.logits.shape == (2, 3, 64, 64)
    assert features.dense.shape == (2, 128, 8, 8) and features.global_embedding.shape == (2, 128)
    assert sorted(features.intermediates) == ["layer3", "layer5"]
    assert features.intermediates["layer3"].shape == (2, 192, 8, 8)
    torch.testing.assert_close(features.dense.norm(dim=1), torch.ones(2, 8, 8))
    text, anchors = inter["class_embeddings"], inter["conditioned_class_embeddings"]
    assert text.shape == (3, 128) and anchors.shape == (2, 3, 128)
    # Eq. 3 by hand.
    adapter = model.text_adapter.projection
    conditioned = torch.cat(
        [text[None] * features.global_embedding[:, None], text[None].expand(2, -1, -1)], -1
    )
    torch.testing.assert_close(anchors, adapter(conditioned))
    # Anchors: every block reads the very same T_new, and Eq. 13 uses it too.
    assert len(anchors_seen) == 2 and all(seen is anchors for seen in anchors_seen)
    scores = torch.einsum("bnd,bdhw->bnhw", anchors, inter["decoded_features"])
    torch.testing.assert_close(inter["score_map"], scores)
    torch.testing.assert_close(
        output.logits, F.interpolate(scores, size=(64, 64), mode="bilinear", align_corners=False)
    )
    for attention in inter["cross_attention"]:
        assert attention.shape == (2, 4, 64, 3)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, 64))
    assert [r.indices.shape for r in inter["routing"]] == [(2, 4, 2), (2, 4, 2)]


def test_permuting_the_vocabulary_permutes_the_logits(model):
    features = model.encode_image(images(1, batch=1))
    with torch.no_grad():
        forward = model.segment(features, ["cat", "dog", "sky", "road"]).logits
        backward = model.segment(features, ["road", "sky", "dog", "cat"]).logits
    torch.testing.assert_close(backward, forward.flip(1), atol=1e-5, rtol=1e-5)


def test_any_vocabulary_size_and_synonyms(model):
    features = model.encode_image(images(2, batch=1))
    with torch.no_grad():
        assert model.segment(features, ["cat"]).logits.shape == (1, 1, 64, 64)
        names = [f"thing {i}" for i in range(300)]
        assert model.segment(features, names).logits.shape == (1, 300, 64, 64)
        synonyms = model.encode_classes([("cat", "kitty")])
        both = F.normalize(model.encode_classes(["cat"]) + model.encode_classes(["kitty"]), dim=-1)
    torch.testing.assert_close(synonyms, both)
    with pytest.raises(ValueError, match="Unknown ldvc option"):
        model.segment(features, ["cat"], theta=0.5)


def test_seen_probability_offset_lowers_only_seen_classes(model):
    features = model.encode_image(images(3, batch=1))
    with torch.no_grad():
        raw = model.segment(features, ["cat", "dog"]).logits
        calibrated = model.segment(
            features, ["cat", "dog"], seen_classes=["cat"], seen_prob_offset=0.1
        ).logits
    torch.testing.assert_close(calibrated[:, 0], raw[:, 0].sigmoid() - 0.1)
    torch.testing.assert_close(calibrated[:, 1], raw[:, 1].sigmoid())


def test_top_m_option_overrides_routing_and_all_windows_match_plain_attention(clip):
    torch.manual_seed(0)
    routed = build_ldvc(backbone=clip, **{**TOY, "input_size": 128}).eval()
    routed.trained_head = True
    plain = build_ldvc(backbone=clip, **{**TOY, "input_size": 128, "route_attention": False})
    plain.load_state_dict(routed.state_dict())
    plain.trained_head = True
    plain.eval()
    features = routed.encode_image(images(4, batch=1, size=128))
    with torch.no_grad():
        everything = routed.segment(features, ["cat", "sky"], top_m=16, return_intermediates=True)
        reference = plain.segment(features, ["cat", "sky"], return_intermediates=True)
        local = routed.segment(features, ["cat", "sky"])
    assert everything.intermediates["routing"][0].indices.shape == (1, 16, 16)
    assert reference.intermediates["routing"] == [None, None]
    torch.testing.assert_close(everything.logits, reference.logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(local.logits, reference.logits, atol=1e-4)


# ------------------------------------------------------------------------------- prompts


def test_pretrain_text_prompts_reproduce_frozen_clip_on_the_template_and_random_do_not(clip):
    pretrain = build_ldvc(backbone=clip, **TOY)
    names = ["cat", "brick wall"]
    with torch.no_grad():
        prompted = pretrain.encode_classes(names)
        frozen = clip.encode_prompts([f"this is a photo of a {name}." for name in names])
        assert torch.all(1 - (prompted * frozen).sum(-1) < 1e-4)
        torch.manual_seed(0)
        random = build_ldvc(backbone=clip, **TOY, text_prompt_init="random").encode_classes(names)
        assert torch.all(1 - (random * frozen).sum(-1) > 1e-3)


def test_a_short_template_fills_the_last_slots_and_still_matches_at_init(clip):
    method = build_ldvc(backbone=clip, **TOY, text_prompt_template="a photo of a")
    prompts = method.text_encoder.prompts
    ids = torch.tensor(clip.tokenizer.encode("a photo of a"))
    layer0 = clip.model.token_embedding(ids) + clip.model.positional_embedding[3:7]
    torch.testing.assert_close(prompts[0, 2:], layer0)
    with pytest.raises(ValueError, match="BPE tokens"):
        build_ldvc(backbone=clip, **TOY, text_prompt_tokens=2)


def test_prompt_depth_length_and_the_frozen_regime(clip):
    method = build_ldvc(
        backbone=clip, **TOY, visual_prompt_depth=3, text_prompt_depth=2, text_prompt_tokens=8
    )
    assert method.image_encoder.prompts.shape == (3, 4, 192)
    assert method.text_encoder.prompts.shape == (2, 8, 128)
    frozen = build_ldvc(
        backbone=clip, **{**TOY, "visual_prompt_tokens": 0}, text_prompt_tokens=0, drop_path=0.0
    ).eval()
    batch = images(5)
    with torch.no_grad():
        features = frozen.encode_image(batch)
        reference = clip.encode_image(clip.normalize(batch), layers=(3, 5))
        text = frozen.encode_classes(["cat"])
        template = clip.encode_prompts(["this is a photo of a cat."])
    torch.testing.assert_close(features.dense, F.normalize(reference.dense, dim=1))
    torch.testing.assert_close(
        features.global_embedding, F.normalize(reference.global_embedding, dim=-1)
    )
    torch.testing.assert_close(features.intermediates["layer3"], reference.intermediates["layer3"])
    torch.testing.assert_close(text, template, atol=1e-5, rtol=1e-5)
    no_depth = build_ldvc(backbone=clip, **TOY, text_prompt_depth=0)
    assert no_depth.text_encoder.prompts.numel() == 0
    with torch.no_grad():
        torch.testing.assert_close(no_depth.encode_classes(["cat"]), template, atol=1e-5, rtol=1e-5)


def test_without_the_text_adapter_the_anchors_are_the_class_embeddings(clip):
    method = build_ldvc(backbone=clip, **TOY, text_adapter=False).eval()
    method.trained_head = True
    with torch.no_grad():
        output = method(images(6), ["cat", "dog"], return_intermediates=True)
    anchors = output.intermediates["conditioned_class_embeddings"]
    torch.testing.assert_close(anchors, output.intermediates["class_embeddings"].expand(2, -1, -1))
    assert not any(name.startswith("text_adapter") for name, _ in method.named_parameters())


def test_imagenet_normalisation_switch(clip):
    method = build_ldvc(backbone=clip, **TOY, image_normalisation="imagenet")
    assert torch.allclose(method.image_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    with pytest.raises(ValueError, match="image_normalisation"):
        build_ldvc(backbone=clip, **TOY, image_normalisation="other")


# ------------------------------------------------------------------------------ training


def test_clip_is_frozen_and_one_step_updates_every_trainable_part(clip):
    torch.manual_seed(0)
    method = build_ldvc(backbone=clip, **TOY)
    assert not any(p.requires_grad for p in method.backbone.parameters())
    groups = method.parameter_groups(2e-4)
    assert {group["lr"] for group in groups} == {2e-4}
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(method.text_encoder.prompts) in decayed
    assert id(method.blocks[0].norm1.weight) not in decayed
    trainable = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in method.backbone.named_parameters()}
    optimizer = torch.optim.AdamW(groups)
    method.train()
    target = torch.randint(0, 3, (2, 64, 64))
    output = method(images(7), ["cat", "dog", "sky"], target=target)
    sum(method.loss(output, target).values()).backward()
    optimizer.step()
    for name, parameter in method.backbone.named_parameters():
        assert torch.equal(parameter, frozen[name]), name
    changed = {n for n, p in method.named_parameters() if p.requires_grad}
    changed = {
        n for n in changed if not torch.equal(dict(method.named_parameters())[n], trainable[n])
    }
    for name in (
        "image_encoder.prompts",
        "image_encoder.projection.weight",
        "text_encoder.prompts",
        "text_adapter.projection.weight",
        "blocks.0.self_attention.qkv.weight",
        "blocks.1.cross_attention.key.weight",
        "blocks.1.mlp.2.weight",
    ):
        assert name in changed, name


def test_focal_and_dice_match_a_hand_computation():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, 0.0]]]])  # B=1, N=2, 1×2 pixels
    target = torch.tensor([[[0, IGNORE_INDEX]]])
    losses = focal_dice_loss(logits, target)

    def focal(x: float, t: int) -> float:
        p = 1 / (1 + math.exp(-x))
        p_t, alpha_t = (p, 0.25) if t else (1 - p, 0.75)
        return -alpha_t * (1 - p_t) ** 2 * math.log(p_t)

    sigmoid = [1 / (1 + math.exp(-x)) for x in (2.0, -1.0)]
    focal_sum = (focal(2.0, 1) + focal(-1.0, 0)) / 2 + (focal(0.5, 0) + focal(0.0, 0)) / 2
    dice = 1 - (2 * sigmoid[0] + 1) / (sum(sigmoid) + 1 + 1)  # class 0 only: num_masks = 1
    assert losses["loss_focal"].item() == pytest.approx(100 * focal_sum, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-5)
    strict = focal_dice_loss(logits, target, ignore_as_negative=False)
    assert strict["loss_focal"].item() == pytest.approx(
        100 * (focal(2.0, 1) + focal(0.5, 0)), rel=1e-5
    )


def test_num_masks_is_the_mean_over_ddp_ranks(monkeypatch):
    logits = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[[0, 0], [1, 1]], [[2, 2], [2, IGNORE_INDEX]]])  # 3 masks here
    local = focal_dice_loss(logits, target)
    reduced = []

    def all_reduce(tensor):  # the other rank holds 7 masks: the sum over ranks is 10
        reduced.append(tensor.item())
        tensor += 7.0

    monkeypatch.setattr(losses.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(losses.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(losses.dist, "all_reduce", all_reduce)
    distributed = focal_dice_loss(logits, target)
    assert reduced == [3.0]
    for name in local:  # divided by the mean count over ranks, 5, instead of 3
        torch.testing.assert_close(distributed[name], local[name] * 3 / 5)
    # No mask on any rank: the normaliser stays at least 1.
    monkeypatch.setattr(losses.dist, "all_reduce", lambda tensor: None)
    empty = focal_dice_loss(logits, torch.full((2, 2, 2), IGNORE_INDEX))
    p = logits.sigmoid()  # every pixel a negative: focal term 0.75 · p² · −ln(1 − p)
    negatives = 0.75 * p**2 * -torch.log1p(-p)
    torch.testing.assert_close(empty["loss_focal"], 100 * negatives.mean(dim=(2, 3)).sum())
    assert empty["loss_dice"].item() == 0.0


def test_num_masks_counts_present_image_class_pairs():
    logits = torch.zeros(2, 3, 2, 2)
    target = torch.tensor([[[0, 0], [1, 1]], [[2, 2], [2, IGNORE_INDEX]]])
    losses = focal_dice_loss(logits, target)
    present = 3  # image 0: classes 0 and 1; image 1: class 2
    positives = torch.tensor([[2, 2, 0], [0, 0, 3]], dtype=torch.float)  # per (image, class) map
    # p = 0.5 everywhere: each pixel's focal term is alpha_t · 0.5² · ln 2.
    focal_each = (positives * 0.25 + (4 - positives) * 0.75) * 0.25 * math.log(2) / 4
    assert losses["loss_focal"].item() == pytest.approx(
        (100 * focal_each.sum() / present).item(), rel=1e-5
    )
    dice_each = 1 - (2 * 0.5 * positives + 1) / (2 + positives + 1)
    assert losses["loss_dice"].item() == pytest.approx(
        (dice_each * (positives > 0)).sum().item() / present, rel=1e-5
    )


def test_inductive_training_never_encodes_unseen_names(clip):
    method = build_ldvc(backbone=clip, **TOY, unseen_classes=("zebra",)).train()
    encoded = []
    hook = method.text_encoder.register_forward_pre_hook(
        lambda module, args: encoded.extend(args[0])
    )
    try:
        output = method(images(8), ["cat", "dog"])
    finally:
        hook.remove()
    assert set(encoded) == {"cat", "dog"} and output.unseen_logits is None


def test_self_training_pseudo_labels_confident_ignored_pixels_with_unseen_classes(clip):
    method = build_ldvc(
        backbone=clip, **TOY, self_training=True, unseen_classes=("zebra", "cat")
    ).train()
    output = method(images(9), ["cat", "dog"])
    assert output.logits.shape[1] == 2 and output.unseen_logits.shape == (2, 1, 8, 8)
    logits = torch.zeros(1, 2, 1, 3)
    unseen = torch.tensor([[[[3.0, -3.0, 3.0]], [[1.0, -0.5, -1.0]]]])  # U = 2
    target = torch.tensor([[[IGNORE_INDEX, IGNORE_INDEX, 1]]])
    losses = method.loss(LdvcOutput(logits=logits, unseen_logits=unseen), target)
    pseudo = torch.tensor([[[2, IGNORE_INDEX, 1]]])  # pixel 0 → unseen 0; pixel 1 not confident
    expected = focal_dice_loss(torch.cat([logits, unseen], 1), pseudo)
    for name in expected:
        torch.testing.assert_close(losses[name], expected[name])


def test_drop_path_drops_whole_samples_and_rescales_the_kept_ones():
    torch.manual_seed(0)
    residual = torch.ones(4000, 3, 5)
    dropped = drop_path(residual, 0.25, training=True)
    per_sample = dropped.flatten(1)
    assert torch.equal(per_sample.amin(1), per_sample.amax(1))  # one decision per sample
    values = per_sample[:, 0]
    torch.testing.assert_close(values.unique(), torch.tensor([0.0, 4 / 3]))
    assert (values == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert values.mean().item() == pytest.approx(1.0, abs=0.04)  # unbiased in expectation
    assert torch.equal(drop_path(residual, 0.25, training=False), residual)


def test_drop_path_acts_on_the_frozen_vit_in_training_only(clip):
    settings = {**TOY, "prompt_dropout": 0.0}  # so that drop-path is the only randomness
    batch = images(10)
    with torch.no_grad():
        torch.manual_seed(0)
        plain = build_ldvc(backbone=clip, **settings, drop_path=0.0)
        reference = plain.eval().encode_image(batch).dense
        torch.testing.assert_close(plain.train().encode_image(batch).dense, reference)
        dropping = build_ldvc(backbone=clip, **settings, drop_path=0.5)
        dropping.load_state_dict(plain.state_dict())
        torch.testing.assert_close(dropping.eval().encode_image(batch).dense, reference)
        dropping.train()
        noisy = [dropping.encode_image(batch).dense for _ in range(2)]
    assert not torch.allclose(noisy[0], reference, atol=1e-3)
    assert not torch.allclose(noisy[0], noisy[1], atol=1e-3)


# --------------------------------------------------------------------------- build, weights


def test_without_trained_weights_it_builds_and_trains_but_refuses_to_segment(clip, tmp_path):
    method = build_ldvc(backbone=clip, **TOY)
    assert isinstance(method, Ldvc) and not method.trained_head and not method.training
    with pytest.raises(UntrainedHeadError, match="no training-free path"):
        method(images(11), ["cat"])
    method.train()
    assert method(images(11), ["cat"]).logits.shape == (2, 1, 64, 64)
    with pytest.raises(WeightsError):
        build_ldvc(backbone=clip, weights=str(tmp_path / "missing"), **TOY)


def test_saved_weights_load_as_a_trained_head_with_their_config(clip, tmp_path):
    torch.manual_seed(0)
    method = build_ldvc(backbone=clip, **{**TOY, "top_m": 3}).train()
    stem = save_weights(method, tmp_path / "ldvc").with_suffix("")
    loaded = build_ldvc(backbone=clip, weights=str(stem))
    assert loaded.trained_head and loaded.config.top_m == 3 and loaded.backbone is not clip
    method.eval()
    method.trained_head = True
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(images(12), ["cat", "dog"]).logits, method(images(12), ["cat", "dog"]).logits
        )
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError):
        build_ldvc(backbone=clip, weights=str(tmp_path / "bad"))


def test_the_registry_builds_ldvc_with_the_toy_clip_by_default():
    import ovseg

    method = ovseg.load("ldvc", pretrained="random", input_size=64, visual_prompt_tokens=2)
    assert method.name == "ldvc" and method.backbone.name == "ovseg-toy-vit"
    assert method.inter_layers == (3, 5)
    assert not method.trained_head  # the shipped head is not for a random CLIP


@pytest.mark.skipif(
    not (ASSETS_DIR / "ldvc-toy.safetensors").is_file()
    or not (ASSETS_DIR / "clip-toy-vit").is_dir(),
    reason="the shipped toy CLIP and LDVC head are not in assets/",
)
def test_the_shipped_head_attaches_to_the_shipped_toy_clip_only(clip):
    # No settings are passed, so the shipped head's architecture always fits: only the CLIP
    # decides whether it is used.
    shipped_clip = load_backbone("toy-vit")
    shipped = build_ldvc(backbone=shipped_clip)
    assert shipped.trained_head and shipped.config.input_size == 128
    assert shipped.backbone is not shipped_clip  # the caller's CLIP stays as it was
    assert build_ldvc().trained_head and build_ldvc(backbone="toy-vit").trained_head
    assert not build_ldvc(backbone=clip).trained_head  # the same architecture, random weights
    assert not build_ldvc(backbone="toy-vit", pretrained="random").trained_head
    assert not build_ldvc(backbone="ovseg-toy-vit").trained_head  # open_clip's name: random
    with pytest.raises(UntrainedHeadError, match="fits only the shipped toy CLIP"):
        build_ldvc(backbone=clip, input_size=64)(images(13), ["cat"])


def test_toy_training_config_is_valid():
    config = json.loads((REPO / "training" / "configs" / "ldvc-toy.json").read_text())
    assert config["method"] == "ldvc" and config["threads"] == 1
    settings = LdvcConfig().replace(**config["method_config"])
    assert settings.input_size // 8 % settings.window_size == 0


# ----------------------------------------------------------------------------- slow checks


@pytest.mark.slow
def test_real_scale_shapes_and_the_eleven_million_parameter_budget():
    backbone = load_backbone("ViT-B-16", None)  # random weights, no download
    method = build_ldvc(backbone=backbone).eval()
    method.trained_head = True
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    assert 10.5e6 <= trainable <= 11.5e6, trainable
    assert method.inter_layers == (7, 11)
    with torch.no_grad():
        features = method.encode_image(torch.rand(1, 3, 512, 512))
        output = method.segment(features, ["cat", "road"], return_intermediates=True)
    inter = output.intermediates
    assert features.dense.shape == (1, 512, 32, 32)
    assert features.global_embedding.shape == (1, 512)
    assert [features.intermediates[f"layer{i}"].shape for i in (7, 11)] == [(1, 768, 32, 32)] * 2
    assert inter["class_embeddings"].shape == (2, 512)
    assert inter["conditioned_class_embeddings"].shape == (1, 2, 512)
    assert [r.indices.shape for r in inter["routing"]] == [(1, 64, 16)] * 2
    attention = inter["cross_attention"][-1]
    assert attention.shape == (1, 8, 1024, 2)
    torch.testing.assert_close(attention.sum(-1), torch.ones(1, 8, 1024))
    assert inter["score_map"].shape == (1, 2, 32, 32)
    assert output.logits.shape == (1, 2, 512, 512)


@pytest.mark.slow
def test_toy_config_trains_through_the_one_trainer(tmp_path):
    run_dir = tmp_path / "ldvc"
    settings = {
        "iterations": 2,
        "batch_size": 2,
        "checkpoint_every": 1,
        "method_config.input_size": 64,
        "method_config.pretrained": "random",
        "dataset.image_size": 64,
        "run_dir": str(run_dir),
        "output": str(run_dir / "final"),
        "eval_images": 2,
        "eval_sets": ["toy-seen"],
        "classes_per_step": 8,
    }
    overrides = [item for k, v in settings.items() for item in ("--set", f"{k}={json.dumps(v)}")]
    # ovseg.methods does not import ldvc yet: register it before the trainer runs.
    script = (
        "import sys, runpy, ovseg.methods.ldvc; "
        "sys.argv = sys.argv[1:]; runpy.run_path('training/train.py', run_name='__main__')"
    )
    config = REPO / "training" / "configs" / "ldvc-toy.json"
    result = subprocess.run(
        [sys.executable, "-c", script, "train.py", "--config", str(config), *overrides],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (run_dir / "train_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2"]
    assert (run_dir / "final.safetensors").is_file()
    assert "| toy-seen | 2 |" in result.stdout


@pytest.mark.slow
def test_overfits_two_toyworld_scenes_from_a_random_clip():
    from ovseg.data.toyworld import ToyWorld

    torch.manual_seed(0)
    world = ToyWorld(image_size=64)
    scenes = [world.scene(seed) for seed in range(2)]
    batch = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in scenes])
    labels = torch.stack([torch.from_numpy(s.labels) for s in scenes])
    present = labels.unique()
    target = torch.searchsorted(present, labels)
    vocabulary = [world.classes[i].name for i in present.tolist()]
    method = build_ldvc(backbone=load_backbone("toy-vit", "random"), **TOY).train()
    optimizer = torch.optim.AdamW(method.parameter_groups(1e-3))
    losses = []
    for _ in range(40):
        output = method(batch, vocabulary)
        loss = sum(method.loss(output, target).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    accuracy = (output.logits.argmax(1) == target).float().mean().item()
    assert losses[-1] < losses[0] / 4 and accuracy > 0.7, (losses[::10], accuracy)
