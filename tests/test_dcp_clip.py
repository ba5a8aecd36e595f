import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import ovseg
import ovseg.backbones
from ovseg.backbones import DenseFeatures, WeightsError, load_backbone
from ovseg.demo.views import dcp_clip_coarse_labels, dcp_clip_selection_table
from ovseg.errors import OptionError
from ovseg.methods.base import IGNORE_INDEX
from ovseg.methods.blocks import cosine_cost_volume
from ovseg.methods.dcp_clip import (
    NOT_SELECTED_LOGIT,
    SEGMENT_OPTIONS,
    DcpClip,
    DcpClipConfig,
    DcpClipOutput,
    build_dcp_clip,
    select_categories,
    tag_validation,
)
from ovseg.methods.weights import save_weights

TEMPLATES = ("a photo of a {}.", "a {}.")
VOCABULARY = [f"class {i}" for i in range(8)]
THINGS = [f"thing {i}" for i in range(30)]  # enough classes that DCS leaves some out


def small_config(**changes):
    """The paper's architecture at a width and window that run in milliseconds."""
    config = DcpClipConfig(
        input_size=64,
        templates=TEMPLATES,
        cost_dim=32,
        cross_attention_heads=4,
        self_attention_heads=2,
        swin_heads=2,
        window_size=4,
        tv_rank=2,
    )
    return config.replace(**changes)


def trained(method):
    method.trained_head = True
    return method.eval()


def image_features(features, index):
    """The features of one image of a batch."""
    return DenseFeatures(
        dense=features.dense[index : index + 1],
        global_embedding=features.global_embedding[index : index + 1],
        intermediates={k: v[index : index + 1] for k, v in features.intermediates.items()},
        attention=features.attention[index : index + 1],
        stride=features.stride,
        input_size=features.input_size,
    )


@pytest.fixture(scope="module")
def backbone():
    # Not the session fixture: DCP-CLIP sets its backbone's requires_grad flags. Seeded, so the
    # random CLIP (and what DCS selects with it) does not depend on which tests ran before.
    torch.manual_seed(0)
    return load_backbone("toy-vit", "random")


@pytest.fixture(scope="module")
def method(backbone):
    torch.manual_seed(0)
    return trained(DcpClip(config=small_config(), backbone=backbone))


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 64, 64, generator=generator)


@pytest.fixture(scope="module")
def features(method, images):
    with torch.no_grad():
        return method.encode_image(images)


@pytest.fixture(autouse=True)
def no_shipped_weights(monkeypatch, tmp_path):
    # Builder tests must not pick up a trained head that appears in assets/ later.
    monkeypatch.setattr(ovseg.backbones, "ASSETS_DIR", tmp_path / "assets")


def random_inputs(seed, classes=50, batch=2):
    generator = torch.Generator().manual_seed(seed)
    cls = torch.randn(batch, 16, generator=generator)
    dense = torch.randn(batch, 16, 4, 5, generator=generator)
    text = torch.randn(classes, 16, generator=generator)
    return cls, dense, text


# ------------------------------------------------------------------ Dynamic Category Selection


def test_dcs_scores_follow_eqs_1_and_2():
    cls, dense, text = random_inputs(0)
    selection = select_categories(cls, dense, text, theta=0.5, tau=100.0)
    patches = dense.flatten(2).transpose(1, 2)  # B×N×D
    patch_scores = F.cosine_similarity(patches[:, None], text[None, :, None], dim=-1)
    image_scores = (100 * F.cosine_similarity(cls[:, None], text[None], dim=-1)).softmax(-1)
    torch.testing.assert_close(selection.patch_scores, patch_scores)
    torch.testing.assert_close(selection.image_scores, image_scores)
    torch.testing.assert_close(selection.image_scores.sum(-1), torch.ones(2))
    suppressed = patch_scores - image_scores[..., None] * patch_scores  # Eq. 2
    torch.testing.assert_close(selection.refined_patch_scores, suppressed)


def test_dcs_selects_the_union_of_patch_winners_and_confident_classes():
    cls, dense, text = random_inputs(1)
    cls[0] = text[7]  # image 0 is confidently class 7
    selection = select_categories(cls, dense, text, theta=0.5, tau=100.0)
    assert selection.from_image[0].nonzero().flatten().tolist() == [7]
    for image, indices in enumerate(selection.indices()):
        winners = set(selection.refined_patch_scores[image].argmax(0).tolist())
        confident = set((selection.image_scores[image] > 0.5).nonzero().flatten().tolist())
        assert set(indices) == winners | confident  # Eq. 5: a union
        assert indices == sorted(set(indices))
        assert set(selection.from_patch[image].nonzero().flatten().tolist()) == winners
    assert selection.num_selected.tolist() == [len(i) for i in selection.indices()]


def test_theta_changes_only_the_image_level_set():
    cls, dense, text = random_inputs(2, classes=30)
    cls[1] = text[3] + 0.5 * text[4]
    reference = select_categories(cls, dense, text, theta=0.5, tau=20.0)
    for theta, at_most in [(0.2, 4), (0.5, 1), (0.8, 1), (0.99, 1)]:
        selection = select_categories(cls, dense, text, theta=theta, tau=20.0)
        assert torch.equal(selection.from_patch, reference.from_patch)
        assert (selection.from_image.sum(-1) <= at_most).all()
    everything = select_categories(cls, dense, text, theta=0.0, tau=20.0)
    assert everything.selected.all()


def test_theta_zero_keeps_classes_whose_probability_underflows():
    cls, dense, text = random_inputs(3)
    selection = select_categories(cls, dense, text, theta=0.0, tau=1e4)
    assert (selection.image_scores == 0).any()  # exp underflow in float32 ...
    assert selection.selected.all()  # ... but θ = 0 still means "no selection"


def test_a_dominant_class_is_suppressed_at_patch_level_and_kept_by_the_image_level():
    generator = torch.Generator().manual_seed(4)
    text = torch.linalg.qr(torch.randn(16, 6, generator=generator)).Q.T  # orthonormal classes
    dense = (text[0] + 0.6 * text[2])[None, :, None, None].repeat(1, 1, 3, 3)
    dense[..., 0, :] = (text[0] + 0.6 * text[5])[:, None]
    cls = text[0][None]
    selection = select_categories(cls, dense, text, theta=0.5, tau=100.0)
    assert selection.patch_scores.argmax(dim=1).unique().tolist() == [0]
    assert 0 not in selection.patch_winners[0].tolist()
    assert selection.indices() == [[0, 2, 5]]
    table = dcp_clip_selection_table(selection, [f"c{i}" for i in range(6)])[0]
    assert table[0]["reason"] == "image score > θ"
    assert table[0]["patch_votes_before_suppression"] == 9
    assert table[2]["reason"] == "patch votes" and table[2]["patch_votes"] == 6
    assert not table[1]["selected"] and table[1]["reason"] == "not selected"


def test_selection_table_has_a_row_per_class(method, features):
    output = method.segment(features, VOCABULARY, return_intermediates=True)
    selection = output.intermediates["selection"]
    tables = dcp_clip_selection_table(selection, VOCABULARY)
    assert len(tables) == 2 and all(len(rows) == len(VOCABULARY) for rows in tables)
    for image, rows in enumerate(tables):
        selected = [row["index"] for row in rows if row["selected"]]
        assert selected == selection.indices()[image]
        winners = selection.patch_winners[image]
        assert sum(row["patch_votes"] for row in rows) == 64  # an 8×8 patch grid
        for row in rows:
            assert row["name"] == VOCABULARY[row["index"]]
            assert row["patch_votes"] == int((winners == row["index"]).sum())
            assert row["in_patch_set"] == (row["patch_votes"] > 0)  # Eq. 3
            assert row["above_theta"] == (row["image_score"] > 0.5)
            assert row["selected"] == (row["above_theta"] or row["in_patch_set"])


def test_theta_and_tau_are_segment_options(method, features, backbone):
    everything = method.segment(features, VOCABULARY, theta=0.0, return_intermediates=True)
    assert everything.intermediates["num_selected"] == [8, 8]
    text = backbone.encode_text(VOCABULARY, TEMPLATES).mean
    for theta, tau in [(0.9, 1.0), (0.05, 1.0), (0.3, 200.0)]:
        output = method.segment(
            features, VOCABULARY, theta=theta, tau=tau, return_intermediates=True
        )
        expected = select_categories(
            features.global_embedding, features.dense, text, theta=theta, tau=tau
        )
        selection = output.intermediates["selection"]
        torch.testing.assert_close(selection.image_scores, expected.image_scores)
        assert torch.equal(selection.selected, expected.selected)
    flat = method.segment(features, VOCABULARY, tau=1.0, return_intermediates=True)
    assert (flat.intermediates["selection"].image_scores < 0.2).all()  # τ = 1: nearly uniform
    with pytest.raises(ValueError, match="sharpness"):
        method.segment(features, VOCABULARY, sharpness=2)
    with pytest.raises(ValueError, match="theta"):
        method.segment(features, VOCABULARY, theta=1.5)


@pytest.mark.parametrize(
    "changes",
    [
        {"theta": 1.5},
        {"tv_rank": 2.5},
        {"tv_rank": -1},
        {"guidance_cls_logits": "sum"},
        {"sed_layers": -1},
        {"cost_dim": 36},  # 36 channels cannot halve twice and stay divisible by 4
        {"cross_attention_layers": 0},
        {"max_selected": 0},
        {"class_chunk_size": 0},
    ],
    ids=str,
)
def test_invalid_settings_are_refused_in_the_config_and_as_options(method, features, changes):
    ((name, _),) = changes.items()
    with pytest.raises(ValueError, match=name):
        small_config(**changes)
    if name in SEGMENT_OPTIONS:
        with pytest.raises(OptionError, match=name):
            method.segment(features, VOCABULARY, **changes)


def target_of_an_unselected_class(output):
    """A target whose labelled pixels are all a class DCS left out of image 0."""
    selected = output.intermediates["selected_classes"][0]
    missing = sorted(set(range(len(THINGS))) - set(selected))
    assert missing, "the test needs a class DCS leaves out"
    target = torch.full((1, 64, 64), IGNORE_INDEX)
    target[0, :20] = missing[0]
    return target, missing[0]


def test_training_forces_ground_truth_classes_in_when_asked(images):
    torch.manual_seed(0)
    method = DcpClip(config=small_config(), backbone=load_backbone("toy-vit", "random")).train()
    with torch.no_grad():
        features = method.encode_image(images[:1])
        plain = method.segment(features, THINGS, return_intermediates=True)
        target, missing = target_of_an_unselected_class(plain)
        forced = method.segment(features, THINGS, target=target, return_intermediates=True)
        method.config = method.config.replace(train_force_gt_classes=False)
        unforced = method.segment(features, THINGS, target=target, return_intermediates=True)
    row = dcp_clip_selection_table(forced.intermediates["selection"], THINGS)[0][missing]
    assert row["selected"] and row["reason"] == "ground truth"
    selected = plain.intermediates["selected_classes"][0]
    assert forced.intermediates["selected_classes"][0] == sorted([*selected, missing])
    assert unforced.intermediates["selected_classes"][0] == selected


def test_a_target_changes_nothing_in_eval_and_tag_validation_still_runs(method, features):
    single = image_features(features, 0)
    options = {"seen_classes": THINGS[:10], "tv_rank": 0, "return_intermediates": True}
    with torch.no_grad():
        plain = method.segment(single, THINGS, **options)
        target, missing = target_of_an_unselected_class(plain)
        labelled = method.segment(single, THINGS, target=target, **options)
    assert labelled.intermediates["selected_classes"] == plain.intermediates["selected_classes"]
    assert missing not in labelled.intermediates["selected_classes"][0]
    changes = labelled.intermediates["tag_validation"][0]
    assert any(change.relabelled for change in changes), "Tag Validation must have run"
    assert changes == plain.intermediates["tag_validation"][0]
    assert torch.equal(labelled.logits, plain.logits)


def near_tie_inputs():
    """171 classes, [CLS] and patches all within bf16's resolution of one direction."""
    generator = torch.Generator().manual_seed(6)
    direction = torch.randn(64, generator=generator)
    text = direction + 1e-3 * torch.randn(171, 64, generator=generator)
    dense = direction[None, :, None, None] + 1e-3 * torch.randn(2, 64, 6, 6, generator=generator)
    cls = direction + 1e-3 * torch.randn(2, 64, generator=generator)
    return cls, dense, text


def test_selection_under_bf16_autocast_equals_the_float32_selection():
    cls, dense, text = near_tie_inputs()
    reference = select_categories(cls, dense, text, theta=0.5, tau=100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_scores = torch.einsum(
            "cd,bdn->bcn", F.normalize(text, dim=-1), F.normalize(dense.flatten(2), dim=1)
        )
        selection = select_categories(cls, dense, text, theta=0.5, tau=100.0)
    flipped = (bf16_scores.argmax(dim=1) != reference.patch_scores.argmax(dim=1)).float().mean()
    assert flipped > 0.3, "the test needs a near-tie that bf16 resolves differently"
    assert selection.patch_scores.dtype == selection.image_scores.dtype == torch.float32
    assert torch.equal(selection.refined_patch_scores, reference.refined_patch_scores)
    assert torch.equal(selection.image_scores, reference.image_scores)
    assert torch.equal(selection.patch_winners, reference.patch_winners)
    assert torch.equal(selection.selected, reference.selected)


def test_training_under_bf16_autocast_selects_what_float32_inference_selects(images):
    torch.manual_seed(0)
    backbone = load_backbone("toy-vit", "random")
    method = DcpClip(config=small_config(), backbone=backbone).train()
    with torch.no_grad():
        features = method.encode_image(images)
        reference = method.segment(features, THINGS, return_intermediates=True)
        method.clear_caches()  # the text must be encoded again, under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = method.segment(features, THINGS, return_intermediates=True)
    reference, mixed = reference.intermediates["selection"], mixed.intermediates["selection"]
    # The class text DCS reads is float32 too: a bf16 text tower moves the scores by ~1e-3.
    torch.testing.assert_close(mixed.patch_scores, reference.patch_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed.image_scores, reference.image_scores, rtol=0, atol=1e-6)
    assert torch.equal(mixed.selected, reference.selected)


def test_max_selected_caps_the_selection():
    cls, dense, text = random_inputs(5, classes=40)
    selection = select_categories(cls, dense, text, theta=0.5, tau=100.0)
    assert (selection.num_selected > 3).all()
    capped = selection.capped(3)
    assert (capped.num_selected == 3).all()
    for image, indices in enumerate(capped.indices()):
        votes = selection.patch_votes[image]
        confident = selection.from_image[image]
        assert set(confident.nonzero().flatten().tolist()) <= set(indices)  # image level first
        kept_votes = min(int(votes[i]) for i in indices if not confident[i])
        dropped = sorted(set(selection.indices()[image]) - set(indices))
        assert (votes[dropped] <= kept_votes).all()
        table = dcp_clip_selection_table(capped, [str(i) for i in range(40)])
        assert table[image][dropped[0]]["reason"].startswith("dropped")


# ----------------------------------------------------------------------------- scatter, shapes


def test_unselected_classes_get_a_very_low_logit_and_never_win(method, features):
    vocabulary = [f"thing {i}" for i in range(30)]
    output = method.segment(features, vocabulary, return_intermediates=True, tag_validation=False)
    assert output.logits.shape == (2, 30, 64, 64)
    assert torch.isfinite(output.logits).all()
    for image, indices in enumerate(output.intermediates["selected_classes"]):
        unselected = sorted(set(range(30)) - set(indices))
        assert unselected, "the test needs classes DCS leaves out"
        assert (output.logits[image, unselected] == NOT_SELECTED_LOGIT).all()
        assert (output.logits[image, indices] > NOT_SELECTED_LOGIT).all()
        labels = set(output.logits[image].argmax(0).unique().tolist())
        assert labels <= set(indices)
        fine_labels = output.intermediates["fine_labels"][image]
        assert torch.equal(fine_labels, output.logits[image].argmax(0))


def segment_recording_stages(method, features, vocabulary):
    """``segment`` with the output shape of each stage of the head, recorded by forward hooks."""
    stages = {
        "cost_features": method.cost_embedding,  # F_cv, before its tokens are flattened
        "textual_guidance": method.alignment.guidance,  # T_g
        "refined_patch_features": method.alignment.cross_layers[-1],  # F_patch^ref
        "refined_cost_features": method.alignment.fusion_layers[-1],  # F_cv^ref, (B·C_s)×N×D_c
        "fine_features": method.decoder,  # F_last
    }
    shapes = {}

    def record(name):
        def hook(module, inputs, output):
            shapes.setdefault(name, tuple(output.shape))  # the first chunk of classes

        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in stages.items()]
    try:
        with torch.no_grad():
            output = method.segment(features, vocabulary, return_intermediates=True)
    finally:
        for hook in hooks:
            hook.remove()
    return output, shapes


def test_intermediates_have_the_papers_shapes(method, features):
    output, shapes = segment_recording_stages(method, features, VOCABULARY)
    inter = output.intermediates
    selected = max(inter["num_selected"])
    assert shapes == {
        "cost_features": (2, selected, 32, 8, 8),  # F_cv: B×C_s×D_c×h×w
        "textual_guidance": (2, selected, 128),  # T_g: C_s×D
        "refined_patch_features": (2, 64, 128),  # F_patch^ref: N×D
        "refined_cost_features": (2 * selected, 64, 32),  # F_cv^ref: N×D_c per class
        "fine_features": (2, selected, 8, 32, 32),  # F_last: 4²N × D_c/4
    }
    coarse_labels = dcp_clip_coarse_labels(inter)
    masked = inter["coarse_cost_map"].masked_fill(~output.class_mask[..., None, None], -math.inf)
    best = masked.argmax(dim=1).flatten(1)  # the argmax over real columns only
    expected = output.selected_classes.gather(1, best).view(2, 8, 8)
    assert torch.equal(coarse_labels, expected)
    assert inter["fine_labels"].shape == (2, 64, 64)
    for image, indices in enumerate(inter["selected_classes"]):
        assert set(coarse_labels[image].unique().tolist()) <= set(indices)


def test_a_batch_with_different_selections_matches_single_images(method, features):
    batch = method.segment(features, THINGS, return_intermediates=True, tv_rank=0)
    sizes = batch.intermediates["num_selected"]
    assert sizes[0] != sizes[1], "the test needs two images with different C_s"
    for image in range(2):
        single = method.segment(image_features(features, image), THINGS, tv_rank=0)
        torch.testing.assert_close(single.logits[0], batch.logits[image], atol=1e-4, rtol=1e-4)


def test_chunks_of_classes_give_the_logits_of_one_chunk(backbone, features):
    logits = {}
    for chunk_size in (3, len(THINGS)):
        torch.manual_seed(0)
        method = trained(
            DcpClip(config=small_config(class_chunk_size=chunk_size), backbone=backbone)
        )
        with torch.no_grad():
            output = method.segment(
                features, THINGS, theta=0.0, tag_validation=False, return_intermediates=True
            )
        assert output.intermediates["num_selected"] == [len(THINGS)] * 2
        logits[chunk_size] = output.logits
    torch.testing.assert_close(logits[3], logits[len(THINGS)], atol=1e-5, rtol=1e-5)


def test_permuting_the_vocabulary_permutes_the_logits(method, features):
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    vocabulary = [VOCABULARY[i] for i in order]
    output = method.segment(features, VOCABULARY)
    permuted = method.segment(features, vocabulary)
    torch.testing.assert_close(permuted.logits, output.logits[:, order], atol=1e-4, rtol=1e-4)


def test_the_head_runs_on_the_selected_classes_only(method, backbone):
    names = [f"concept {i}" for i in range(847)]
    with torch.no_grad():
        text = backbone.encode_text(names, TEMPLATES).mean
        features = method.encode_image(torch.rand(1, 3, 64, 64))
    # Patches that look exactly like three of the 847 classes, and an uninformative [CLS].
    dense = torch.zeros_like(features.dense)
    dense[..., :3, :] = text[5][:, None, None]
    dense[..., 3:6, :] = text[100][:, None, None]
    dense[..., 6:, :] = text[700][:, None, None]
    features = dataclasses.replace(features, dense=dense)
    seen_classes = []
    hooks = [
        module.register_forward_pre_hook(lambda _, args: seen_classes.append(args[0].shape[1]))
        for module in (method.cost_embedding, method.decoder)
    ]
    try:
        with torch.no_grad():
            output = method.segment(features, names, return_intermediates=True)
    finally:
        for hook in hooks:
            hook.remove()
    selected = output.intermediates["selected_classes"][0]
    assert {5, 100, 700} <= set(selected) and len(selected) <= 10
    assert seen_classes and max(seen_classes) == len(selected) < 847
    assert output.logits.shape == (1, 847, 64, 64)


# ---------------------------------------------------------------------------- training


def test_only_query_value_rows_and_position_embeddings_of_clip_train():
    backbone = load_backbone("toy-vit", "random")
    method = DcpClip(config=small_config(), backbone=backbone)
    assert all(p.requires_grad for p in backbone.parameters())  # building changes nothing
    method.train()
    trainable = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    expected = {
        n.replace("in_proj", "parametrizations.in_proj")
        .replace("proj_weight", "proj_weight.original")
        .replace("proj_bias", "proj_bias.original")
        for n, _ in load_backbone("toy-vit", "random").model.named_parameters()
        if n.endswith(("attn.in_proj_weight", "attn.in_proj_bias", "positional_embedding"))
    }
    assert trainable == expected
    assert "visual.positional_embedding" in trainable and "positional_embedding" in trainable
    assert any(n.startswith("transformer.") for n in trainable)  # the text tower too


def test_frozen_clip_option_freezes_all_of_clip(images):
    backbone = load_backbone("toy-vit", "random")
    method = trained(DcpClip(config=small_config(finetune_clip=False), backbone=backbone))
    assert [group["lr"] for group in method.parameter_groups(2e-4)] == [2e-4]
    assert not any(p.requires_grad for p in backbone.parameters())


def test_a_single_class_vocabulary_works_on_both_paths(method, features, backbone, images):
    output = method.segment(features, ["cat"], return_intermediates=True)
    assert output.logits.shape == (2, 1, 64, 64)
    assert output.intermediates["selected_classes"] == [[0], [0]]
    free = DcpClip(config=small_config(), backbone=backbone).eval()
    with torch.no_grad():
        assert free.segment(free.encode_image(images), ["cat"]).logits.shape == (2, 1, 64, 64)


def test_parameter_groups_follow_the_paper(method):
    groups = method.parameter_groups(2e-4)
    assert sorted({group["lr"] for group in groups}) == pytest.approx([2e-6, 2e-4])
    head = [g for g in groups if g["lr"] == 2e-4]
    assert len(head) == 1 and head[0]["weight_decay"] == 1e-4
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in method.parameters() if p.requires_grad}
    head_ids = {id(p) for p in head[0]["params"]}
    assert head_ids == {
        id(p) for n, p in method.named_parameters() if not n.startswith("backbone.")
    }
    torch.optim.AdamW(groups, weight_decay=1e-4)  # the groups are valid optimiser input


def test_an_optimiser_step_moves_query_and_value_rows_only(images):
    torch.manual_seed(0)
    backbone = load_backbone("toy-vit", "random")
    method = DcpClip(config=small_config(), backbone=backbone).train()
    optimiser = torch.optim.AdamW(method.parameter_groups(2e-4), weight_decay=1e-4)
    before = {n: p.detach().clone() for n, p in method.state_dict().items()}
    target = torch.randint(0, 8, (2, 64, 64))
    target[:, :8] = IGNORE_INDEX
    output = method.segment(method.encode_image(images), VOCABULARY, target=target)
    method.loss(output, target)["loss_bce"].backward()
    optimiser.step()
    after = method.state_dict()  # the fused [Q; K; V] projections, as open_clip names them
    width = {"backbone.model.visual": 192, "backbone.model.transformer": 128}
    for tower, size in width.items():
        name = f"{tower}.transformer.resblocks.0.attn.in_proj_weight".replace(
            "transformer.transformer", "transformer"
        )
        rows = {"q": slice(0, size), "k": slice(size, 2 * size), "v": slice(2 * size, None)}
        assert torch.equal(after[name][rows["k"]], before[name][rows["k"]]), name
        assert not torch.equal(after[name][rows["q"]], before[name][rows["q"]]), name
        assert not torch.equal(after[name][rows["v"]], before[name][rows["v"]]), name
        bias = name.replace("weight", "bias")
        assert torch.equal(after[bias][rows["k"]], before[bias][rows["k"]])
    for name in (
        "backbone.model.visual.transformer.resblocks.0.attn.out_proj.weight",
        "backbone.model.visual.conv1.weight",
        "backbone.model.token_embedding.weight",
    ):
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert not torch.equal(
        after["backbone.model.visual.positional_embedding"],
        before["backbone.model.visual.positional_embedding"],
    )


def test_training_refreshes_the_selection_text_every_n_calls(images, monkeypatch):
    backbone = load_backbone("toy-vit", "random")
    method = DcpClip(config=small_config(dcs_text_refresh_iters=2), backbone=backbone).train()
    encoded = []
    original = backbone.encode_text

    def counting(vocabulary, templates):
        result = original(vocabulary, templates)
        encoded.append((len(vocabulary), result.mean.requires_grad))
        return result

    monkeypatch.setattr(backbone, "encode_text", counting)
    features = method.encode_image(images[:1])
    for _ in range(3):
        output = method.segment(features, THINGS)
    whole = [grad for count, grad in encoded if count == len(THINGS)]
    assert whole == [False, False]  # calls 0 and 2, without gradient
    selected = [(count, grad) for count, grad in encoded if count != len(THINGS)]
    assert len(selected) == 3 and all(grad for _, grad in selected)
    assert selected[-1][0] == int(output.class_mask.sum())


def test_loss_is_binary_cross_entropy_over_the_selected_channels():
    generator = torch.Generator().manual_seed(0)
    selected_logits = torch.randn(2, 3, 4, 4, generator=generator)
    classes = torch.tensor([[0, 2, 5], [1, 4, 1]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    target = torch.randint(0, 6, (2, 4, 4), generator=generator)
    target[0, 0] = IGNORE_INDEX
    output = DcpClipOutput(
        logits=torch.zeros(2, 6, 4, 4),
        selected_logits=selected_logits,
        selected_classes=classes,
        class_mask=mask,
    )
    expected = []
    for image in range(2):
        terms = []
        for slot in range(3):
            if not mask[image, slot]:
                continue
            for y in range(4):
                for x in range(4):
                    label = int(target[image, y, x])
                    if label == IGNORE_INDEX:
                        continue
                    z = float(selected_logits[image, slot, y, x])
                    positive = label == int(classes[image, slot])
                    p = 1 / (1 + math.exp(-z))
                    terms.append(-math.log(p if positive else 1 - p))
        expected.append(sum(terms) / len(terms))
    loss = DcpClip.loss(None, output, target)["loss_bce"]
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5)


# ---------------------------------------------------------------------------- tag validation


def tag_validation_inputs():
    generator = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    dense = torch.zeros(8, 4, 4)
    dense[:, :2, :] = (text[3] + 0.2 * text[1])[:, None, None]  # predicted 1, looks like 3
    dense[:, 2:, :2] = text[2][:, None, None]  # predicted 2, looks like 2
    dense[:, 2:, 2:] = text[4][:, None, None]  # predicted 0 (seen), looks like 4
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[:8] = 1
    labels[8:, :8] = 2
    return labels, dense, text


def pooled_rank(dense_region, text, label):
    scores = F.normalize(dense_region, dim=0) @ text.T
    return 1 + int((scores > scores[label]).sum()), int(scores.argmax())


def test_tag_validation_relabels_unseen_regions_whose_label_ranks_below_k():
    labels, dense, text = tag_validation_inputs()
    seen = torch.tensor([True, False, False, True, True, True])
    rank, best = pooled_rank(dense[:, 0, 0], text, 1)
    assert best == 3 and rank > 1
    for k in range(6):
        new_labels, decisions = tag_validation(labels, dense, text, seen=seen, rank_cutoff=k)
        by_class = {d.region_class: d for d in decisions}
        assert set(by_class) == {1, 2}  # seen class 0 is never examined
        assert by_class[1].rank == rank and by_class[2].rank == 1
        relabel = rank > k
        assert by_class[1].relabelled == relabel
        assert torch.equal(new_labels[:8] == 3, torch.full((8, 16), relabel))
        assert (new_labels[8:, :8] == 2).all()
        assert (new_labels[8:, 8:] == 0).all()  # the seen region is left alone


def test_tag_validation_with_k_zero_takes_the_pooled_argmax_everywhere_unseen():
    labels, dense, text = tag_validation_inputs()
    seen = torch.zeros(6, dtype=torch.bool)
    new_labels, _ = tag_validation(labels, dense, text, seen=seen, rank_cutoff=0)
    assert (new_labels[:8] == 3).all()
    assert (new_labels[8:, :8] == 2).all()
    assert (new_labels[8:, 8:] == 4).all()


def test_tag_validation_changes_nothing_for_seen_classes_or_large_k():
    labels, dense, text = tag_validation_inputs()
    all_seen = torch.ones(6, dtype=torch.bool)
    new_labels, decisions = tag_validation(labels, dense, text, seen=all_seen, rank_cutoff=0)
    assert torch.equal(new_labels, labels) and decisions == []
    none_seen = torch.zeros(6, dtype=torch.bool)
    new_labels, _ = tag_validation(labels, dense, text, seen=none_seen, rank_cutoff=6)
    assert torch.equal(new_labels, labels)


def test_tag_validation_can_be_restricted_to_candidates():
    labels, dense, text = tag_validation_inputs()
    seen = torch.tensor([True, False, False, True, True, True])
    candidates = torch.tensor([True, True, True, False, False, True])
    new_labels, decisions = tag_validation(
        labels, dense, text, seen=seen, rank_cutoff=0, candidates=candidates
    )
    assert 3 not in new_labels.unique().tolist()
    assert all(d.new_class in (0, 1, 2, 5) for d in decisions)


def test_segment_applies_tag_validation_to_unseen_regions(method, features):
    seen = tuple(VOCABULARY[:4])
    before = method.segment(features, VOCABULARY, tag_validation=False, return_intermediates=True)
    after = method.segment(
        features, VOCABULARY, seen_classes=seen, tv_rank=0, return_intermediates=True
    )
    fine, labels = after.intermediates["fine_labels"], after.logits.argmax(1)
    assert torch.equal(fine, before.logits.argmax(1))
    seen_pixels = fine < 4
    assert torch.equal(labels[seen_pixels], fine[seen_pixels])
    changes = [
        (image, d)
        for image, decisions in enumerate(after.intermediates["tag_validation"])
        for d in decisions
    ]
    assert all(d.region_class >= 4 and d.rank_cutoff == 0 for _, d in changes)
    relabelled = [(image, d) for image, d in changes if d.relabelled]
    assert relabelled, "tv_rank=0 must relabel some unseen region of a random model"
    for image, change in relabelled:
        region = fine[image] == change.region_class
        assert (labels[image][region] == change.new_class).all()
    untouched = method.segment(features, VOCABULARY, seen_classes=seen, tv_rank=8)
    torch.testing.assert_close(untouched.logits, before.logits)


# ---------------------------------------------------------------------------- ablations


@pytest.mark.parametrize(
    "changes",
    [
        {"use_dcs": False},
        {"use_tga": False},
        {"tga_cross_attention": False},
        {"tga_self_attention": False},
        {"tga_cross_attention": False, "tga_self_attention": False},
        {"guidance_cls_logits": "none"},
        {"guidance_cls_logits": "none", "guidance_prompt": False},
        {"guidance_cls_logits": "hadamard"},
        {"sed_layers": 0},
        {"sed_layers": 1},
        {"spatial_enhance": False},
        {"fuse_patch": False, "fuse_sim": False, "fuse_attention": False},
        {"fuse_attention": False},
        {"use_tga": False, "sed_layers": 0, "use_dcs": False},
    ],
)
def test_ablation_switches_build_and_run(backbone, images, changes):
    torch.manual_seed(0)
    method = trained(DcpClip(config=small_config(**changes), backbone=backbone))
    with torch.no_grad():
        output = method.segment(method.encode_image(images[:1]), VOCABULARY)
    assert output.logits.shape == (1, 8, 64, 64)
    assert torch.isfinite(output.logits).all()
    names = {n for n, _ in method.named_parameters() if not n.startswith("backbone.")}
    assert (method.alignment is None) == (changes.get("use_tga") is False)
    assert (method.decoder is None) == (changes.get("sed_layers") == 0)
    has_guidance = method.alignment is not None and method.alignment.guidance is not None
    expects_prompt = has_guidance and changes.get("guidance_prompt", True)
    assert any(n.endswith(".prompt") for n in names) == expects_prompt
    if changes.get("use_dcs") is False:
        selection = method.segment(
            method.encode_image(images[:1]), VOCABULARY, return_intermediates=True
        ).intermediates["selection"]
        assert selection.selected.all()


ABLATIONS = [
    {"use_dcs": False},
    {"max_selected": 3},
    {"use_tga": False},
    {"tga_cross_attention": False},
    {"tga_self_attention": False},
    {"guidance_cls_logits": "none"},
    {"guidance_cls_logits": "hadamard"},
    {"guidance_prompt": False},
    {"sed_layers": 1},
    {"sed_layers": 0},
    {"spatial_enhance": False},
    {"fuse_patch": False},
    {"fuse_sim": False},
    {"fuse_attention": False},
    {"tag_validation": False},
]


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        *((changes, {}) for changes in ABLATIONS),
        # One selected (unseen) class labels every pixel; unrestricted, TV moves the image to
        # its pooled best class, restricted it has nowhere to go.
        ({"tv_restrict_to_selected": True}, {"max_selected": 1}),
    ],
    ids=lambda config: str(config)[1:-1],
)
def test_every_ablation_switch_changes_the_logits(backbone, images, changes, setting):
    def build(**config):
        torch.manual_seed(0)
        return trained(
            DcpClip(config=small_config(tv_rank=0, **setting, **config), backbone=backbone)
        )

    def logits(method):
        with torch.no_grad():
            features = method.encode_image(images[:1])
            return method.segment(features, THINGS, seen_classes=THINGS[20:]).logits

    full, ablated = build(), build(**changes)
    # Every weight the two models share is copied, so only the switch can tell them apart.
    own = ablated.state_dict()
    shared = {
        name: value
        for name, value in full.state_dict().items()
        if not name.startswith("backbone.") and name in own and own[name].shape == value.shape
    }
    ablated.load_state_dict(shared, strict=False)
    expected = logits(full)
    assert not torch.allclose(logits(ablated), expected, atol=1e-3)


def test_each_patch_reads_its_own_row_of_the_clip_attention_map(method, features):
    decoder = method.decoder
    # Patch i attends only to patch π(i): its row is one-hot at π(i), its column at π⁻¹(i).
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    attention = torch.zeros(2, 64, 64)
    attention[:, torch.arange(64), order] = 1.0
    blocks = [features.intermediates[f"layer{i}"] for i in method.feature_layers]
    with torch.no_grad():
        guidance = decoder.guidance(features.dense, blocks, attention)
        rows = attention.view(2, 8, 8, 64).permute(0, 3, 1, 2)  # channel j at patch i: A[i, j]
        expected = decoder.swin_attention_projections[0](rows)
    torch.testing.assert_close(guidance.swin[0][:, decoder.dims[0] :], expected)


def test_decoder_depth_sets_the_output_resolution(backbone, images):
    for layers, size in [(0, 8), (1, 16), (2, 32)]:
        method = trained(DcpClip(config=small_config(sed_layers=layers), backbone=backbone))
        sizes = []

        def record(module, args, sizes=sizes):
            sizes.append(args[0].shape[-1])

        method.head.register_forward_pre_hook(record)
        with torch.no_grad():
            method.segment(method.encode_image(images[:1]), VOCABULARY)
        assert sizes == [size]  # the head reads F_last


# ---------------------------------------------------------------------------- training-free


def test_training_free_path_is_the_maskclip_cost_volume_over_selected_classes(backbone, images):
    config = dataclasses.asdict(small_config())
    del config["backbone"]
    method = ovseg.load("dcp-clip", backbone=backbone, **config)
    assert not method.trained_head
    with torch.no_grad():
        features = method.encode_image(images)
        maskclip = backbone.encode_image(backbone.normalize(images), dense_mode="maskclip")
        torch.testing.assert_close(features.dense, maskclip.dense)
        output = method.segment(features, VOCABULARY, return_intermediates=True)
        text = backbone.encode_text(VOCABULARY, TEMPLATES).mean
    cost = cosine_cost_volume(maskclip.dense, text) / method.config.temperature
    expected = F.interpolate(cost, size=(64, 64), mode="bilinear", align_corners=False)
    for image, indices in enumerate(output.intermediates["selected_classes"]):
        torch.testing.assert_close(output.logits[image, indices], expected[image, indices])
        others = sorted(set(range(8)) - set(indices))
        assert (output.logits[image, others] == NOT_SELECTED_LOGIT).all()


# ---------------------------------------------------------------------------- builder, weights


def test_builder_without_shipped_weights_falls_back_to_training_free(backbone):
    method = build_dcp_clip(backbone=backbone, input_size=64, templates=TEMPLATES)
    assert isinstance(method, DcpClip) and not method.trained_head
    with pytest.raises(WeightsError):
        build_dcp_clip(backbone=backbone, weights="/nonexistent/dcp.safetensors")


def test_saved_weights_load_back_as_a_trained_head(backbone, images, tmp_path, monkeypatch):
    torch.manual_seed(0)
    # Saved weights carry the head and the fine-tuned CLIP tensors; the frozen rest comes from the
    # backbone the weights are loaded onto, so the source is built on a copy of that backbone.
    source = trained(DcpClip(config=small_config(), backbone=copy.deepcopy(backbone)))
    with torch.no_grad():
        source.head.bias.fill_(0.3)
        expected = source(images[:1], VOCABULARY).logits
    path = save_weights(source, tmp_path / "dcp")
    shared_before = backbone.model.visual.conv1.weight.clone()
    loaded = build_dcp_clip(backbone=backbone, weights=str(path))
    assert loaded.trained_head and loaded.config.cost_dim == 32  # config read from the JSON
    assert torch.equal(backbone.model.visual.conv1.weight, shared_before)  # shared one untouched
    with torch.no_grad():
        torch.testing.assert_close(loaded(images[:1], VOCABULARY).logits, expected)
    monkeypatch.setattr(ovseg.backbones, "ASSETS_DIR", tmp_path)
    save_weights(source, tmp_path / "dcp-clip-toy")
    assert not build_dcp_clip(backbone=backbone).trained_head  # a random CLIP: not the shipped one
    monkeypatch.setattr(backbone, "name", f"local-dir:{tmp_path / 'clip-toy-vit'}")
    assert build_dcp_clip(backbone=backbone).trained_head
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError):
        build_dcp_clip(backbone=backbone, weights=str(path))


def test_non_vit_backbones_are_refused(toy_convnext):
    with pytest.raises(ValueError, match="ViT"):
        DcpClip(config=small_config(), backbone=toy_convnext)


@pytest.mark.slow
def test_vit_b16_shapes_at_384():
    clip = load_backbone("ViT-B-16", None)
    method = trained(
        DcpClip(config=DcpClipConfig(input_size=384, templates=TEMPLATES), backbone=clip)
    )
    new_parameters = sum(
        p.numel() for n, p in method.named_parameters() if not n.startswith("backbone.")
    )
    assert 9e6 < new_parameters < 15e6  # the paper's "+10 M learnable over CAT-Seg"
    with torch.no_grad():
        features = method.encode_image(torch.rand(1, 3, 384, 384))
    output, shapes = segment_recording_stages(method, features, ["cat", "sky"])
    selected = output.intermediates["num_selected"][0]
    assert features.dense.shape == (1, 512, 24, 24)  # F_patch: N = 576, D = 512
    assert shapes == {
        "cost_features": (1, selected, 128, 24, 24),
        "textual_guidance": (1, selected, 512),
        "refined_patch_features": (1, 576, 512),
        "refined_cost_features": (selected, 576, 128),
        "fine_features": (1, selected, 32, 96, 96),  # 4²·576 positions × 32
    }
    assert output.logits.shape == (1, 2, 384, 384)


def test_tag_validation_on_a_real_clip_takes_a_benchmarks_seen_classes_from_its_table(
    method, features, monkeypatch
):
    from ovseg.vocabulary import load_vocabulary

    voc = load_vocabulary("voc-20")  # every class is seen in COCO-Stuff, few in ToyWorld
    with torch.no_grad():
        toy = method.segment(features, voc.classes, tv_rank=0, return_intermediates=True)
        monkeypatch.setattr(method.backbone, "name", "ViT-B-16")  # a real CLIP
        real = method.segment(features, voc.classes, tv_rank=0, return_intermediates=True)
    assert any(toy.intermediates["tag_validation"]), "the toy CLIP must see unseen regions"
    assert real.intermediates["tag_validation"] == [[], []]
    assert torch.equal(real.logits.argmax(1), real.intermediates["fine_labels"])
