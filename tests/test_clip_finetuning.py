"""CAT-Seg's "attention" fine-tuning scope (DCP-CLIP, ESC-Net): K is frozen by construction."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from ovseg.backbones import build_sam, load_backbone
from ovseg.backbones.finetune import query_value_parameters, set_finetuning_scope
from ovseg.methods.dcp_clip import DcpClip, DcpClipConfig, build_dcp_clip
from ovseg.methods.esc_net import EscNet, EscNetConfig, build_esc_net
from ovseg.methods.weights import save_weights

VOCABULARY = ["cat", "dog", "sky", "grass"]
TEMPLATES = ("a photo of a {}.",)


@pytest.fixture(scope="module")
def sam_path(tmp_path_factory):
    torch.manual_seed(0)
    return build_sam("toy").save(tmp_path_factory.mktemp("sam") / "sam-test")


def dcp_clip(backbone):
    config = DcpClipConfig(
        input_size=64,
        templates=TEMPLATES,
        cost_dim=16,
        cross_attention_heads=2,
        self_attention_heads=2,
        swin_heads=2,
        window_size=4,
    )
    return DcpClip(config=config, backbone=backbone).eval()


def esc_net(backbone, sam_path):
    config = EscNetConfig(
        input_size=64,
        templates=TEMPLATES,
        hidden_dim=16,
        swin_heads=2,
        text_heads=2,
        window_size=4,
        decoder_dims=(8, 8),
        skip_dims=(4, 4),
        sam="toy",
        sam_checkpoint=str(sam_path),
    )
    return EscNet(config=config, backbone=backbone, sam=build_sam("toy", sam_path)).eval()


def build(name, backbone, sam_path):
    torch.manual_seed(0)
    if name == "esc-net":
        return esc_net(backbone, sam_path)
    return dcp_clip(backbone)


def images(seed=0):
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def fused_projections(backbone):
    """Every fused [Q; K; V] weight and bias of both towers, as plain tensors."""
    return {
        name: tensor.detach().clone()
        for name, tensor in backbone.state_dict().items()
        if name.endswith(("attn.in_proj_weight", "attn.in_proj_bias"))
    }


def train_steps(method, steps=2):
    """AdamW at a large rate and weight decay, so any leak into K would show."""
    method.train()
    optimiser = torch.optim.AdamW(method.parameter_groups(1e-2), weight_decay=0.5)
    for group in optimiser.param_groups:
        group["lr"], group["weight_decay"] = 1e-2, 0.5
    target = torch.randint(
        0, len(VOCABULARY), (2, 64, 64), generator=torch.Generator().manual_seed(3)
    )
    for _ in range(steps):
        output = method(images(), VOCABULARY, target=target)
        loss = sum(method.loss(output, target).values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


@pytest.mark.parametrize("name", ["dcp-clip", "esc-net"])
def test_key_rows_stay_pretrained_and_query_value_rows_train_even_in_a_deep_copy(name, sam_path):
    original = build(name, load_backbone("toy-vit", "random"), sam_path)
    method = copy.deepcopy(original.train())  # a gradient hook would not survive this copy
    before = fused_projections(method.backbone)
    train_steps(method)
    after = fused_projections(method.backbone)
    assert len(before) == 2 * (6 + 4)  # weight and bias of 6 visual and 4 text blocks
    for key, tensor in before.items():
        width = tensor.shape[0] // 3
        assert torch.equal(after[key][width : 2 * width], tensor[width : 2 * width]), key
    moved = [
        not torch.equal(after[key][: tensor.shape[0] // 3], tensor[: tensor.shape[0] // 3])
        for key, tensor in before.items()
        if key.endswith("weight")
    ]
    assert all(moved)  # Q rows of every block, visual and text, were trained
    text = "model.transformer.resblocks.0.attn.in_proj_weight"
    width = before[text].shape[0] // 3
    assert not torch.equal(after[text][2 * width :], before[text][2 * width :])  # V rows too


@pytest.mark.parametrize("name", ["dcp-clip", "esc-net"])
def test_building_and_running_a_method_leaves_a_shared_backbone_untouched(name, sam_path):
    backbone = load_backbone("toy-vit", "random")
    flags = {n: p.requires_grad for n, p in backbone.named_parameters()}
    method = build(name, backbone, sam_path)
    assert method.backbone is backbone
    with torch.no_grad():
        method(images(), VOCABULARY)
    assert {n: p.requires_grad for n, p in backbone.named_parameters()} == flags
    assert not query_value_parameters(backbone.model)  # no split until the method trains


def test_the_split_changes_no_output_and_no_state_dict_key():
    backbone = load_backbone("toy-vit", "random")
    state = backbone.state_dict()
    tokens = torch.randint(0, 100, (2, backbone.model.context_length))
    with torch.no_grad():
        image, text = backbone.model.encode_image(images()), backbone.model.encode_text(tokens)
    set_finetuning_scope(backbone.model, "attention")
    assert len(query_value_parameters(backbone.model)) == 2 * (6 + 4)
    with torch.no_grad():  # the same math; PyTorch's fused attention kernel only for unsplit
        assert torch.allclose(backbone.model.encode_image(images()), image, rtol=0, atol=1e-5)
        assert torch.allclose(backbone.model.encode_text(tokens), text, rtol=0, atol=1e-5)
    split_state = backbone.state_dict()
    assert set(split_state) == set(state)
    assert all(torch.equal(split_state[k], state[k]) for k in state)
    trainable = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert all(
        n.endswith(
            (
                "parametrizations.in_proj_weight.original",
                "parametrizations.in_proj_bias.original",
                "positional_embedding",
            )
        )
        for n in trainable
    )


def test_full_scope_after_attention_trains_key_rows_again():
    backbone = load_backbone("toy-vit", "random")
    set_finetuning_scope(backbone.model, "attention")
    before = fused_projections(backbone)
    set_finetuning_scope(backbone.model, "full")
    assert not query_value_parameters(backbone.model)
    attention = backbone.model.visual.transformer.resblocks[0].attn
    assert isinstance(attention.in_proj_weight, torch.nn.Parameter)
    assert attention.in_proj_weight.requires_grad
    assert all(torch.equal(t, before[k]) for k, t in fused_projections(backbone).items())


@pytest.mark.parametrize("name", ["dcp-clip", "esc-net"])
def test_a_head_trained_with_split_attention_saves_fused_keys_and_reloads_exactly(
    name, sam_path, tmp_path
):
    torch.manual_seed(5)
    method = build(name, load_backbone("toy-vit", "random"), sam_path)
    train_steps(method, steps=1)
    path = save_weights(method.eval(), tmp_path / name)
    saved = load_file(path)
    assert not any("parametrizations" in key for key in saved)
    assert "backbone.model.visual.transformer.resblocks.0.attn.in_proj_weight" in saved
    assert "backbone.model.visual.conv1.weight" not in saved  # frozen CLIP is left out
    torch.manual_seed(5)
    same_clip = load_backbone("toy-vit", "random")
    builder = build_esc_net if name == "esc-net" else build_dcp_clip
    reloaded = builder(backbone=same_clip, weights=str(path))
    assert reloaded.trained_head
    method.trained_head = True
    with torch.no_grad():
        expected = method(images(1), VOCABULARY).logits
        assert torch.allclose(reloaded(images(1), VOCABULARY).logits, expected, atol=1e-5)
