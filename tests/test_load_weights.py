"""Trained heads go out as safetensors + JSON config and come back in by path or hub name."""

import copy
import shutil

import huggingface_hub
import pytest
import torch

import ovseg
from ovseg.backbones import WeightsError
from ovseg.methods.weights import save_weights, weights_file


@pytest.fixture
def saved_dcp_clip(tmp_path, toy_vit):
    """A DCP-CLIP head with non-default architecture settings, saved the way train.py saves it."""
    clip = copy.deepcopy(toy_vit)  # training changes the CLIP; the session's stays as it is
    method = ovseg.load("dcp-clip", backbone=clip, input_size=64, cost_dim=32, window_size=4)
    method.train()  # sets what training changes: the head and CLIP's Q/V and position embeddings
    with torch.no_grad():
        for parameter in method.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01)
    return method.eval(), save_weights(method, tmp_path / "heads" / "dcp-clip-custom")


def fake_hub(folder, calls):
    def download(repo_id, filename, **_):
        calls.append((repo_id, filename))
        path = folder / filename.split("/")[-1]
        if not path.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        snapshot = folder / "snapshot"
        snapshot.mkdir(exist_ok=True)
        return str(shutil.copy(path, snapshot / path.name))

    return download


def test_saved_weights_load_by_path_without_repeating_the_settings(saved_dcp_clip, toy_vit):
    method, path = saved_dcp_clip
    loaded = ovseg.load("dcp-clip", backbone=toy_vit, weights=str(path))
    assert loaded.trained_head
    assert (loaded.config.input_size, loaded.config.cost_dim) == (64, 32)
    theirs = loaded.state_dict()
    assert theirs.keys() == method.state_dict().keys()
    for name, mine in method.state_dict().items():
        assert torch.equal(mine, theirs[name]), name


def test_hub_weights_are_downloaded_with_their_config(saved_dcp_clip, toy_vit, monkeypatch):
    method, path = saved_dcp_clip
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub(path.parent, calls))
    loaded = ovseg.load("dcp-clip", backbone=toy_vit, weights="hf-hub:me/heads/dcp-clip-custom")
    assert calls == [
        ("me/heads", "dcp-clip-custom.safetensors"),
        ("me/heads", "dcp-clip-custom.json"),
    ]
    assert loaded.trained_head and loaded.config.cost_dim == 32
    first = next(iter(method.state_dict()))
    assert torch.equal(method.state_dict()[first], loaded.state_dict()[first])


def test_bad_hub_names_and_missing_hub_files_are_weights_errors(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="hf-hub:org/repo/stem"):
        ovseg.load("dcp-clip", weights="hf-hub:only-a-repo")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub(tmp_path, []))
    with pytest.raises(WeightsError, match=r"Could not fetch heads\.safetensors from me/repo"):
        ovseg.load("dcp-clip", weights="hf-hub:me/repo/heads")


def test_saved_weights_leave_out_the_frozen_clip_but_keep_what_was_fine_tuned(saved_dcp_clip):
    from safetensors import safe_open

    from ovseg.backbones.finetune import fused_state_name
    from ovseg.methods.weights import frozen_pretrained_keys

    method, path = saved_dcp_clip
    with safe_open(str(path), "pt") as file:
        saved = set(file.keys())
    frozen = frozen_pretrained_keys(method)
    assert frozen and not saved & frozen
    tuned = {
        fused_state_name(n)
        for n, p in method.named_parameters()
        if p.requires_grad and n.startswith("backbone")
    }
    assert "backbone.model.visual.transformer.resblocks.0.attn.in_proj_weight" in tuned
    assert tuned and tuned <= saved  # CLIP's fine-tuned Q/V rows travel with the head
    assert saved | frozen == set(method.state_dict())


def test_a_file_missing_trainable_tensors_is_refused(saved_dcp_clip, toy_vit, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved_dcp_clip
    state = load_file(str(path))
    state.pop(next(key for key in state if not key.startswith("backbone")))
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(WeightsError, match="missing"):
        ovseg.load("dcp-clip", backbone=toy_vit, weights=str(broken), input_size=64, cost_dim=32,
                   window_size=4)  # fmt: skip


def test_another_methods_weights_are_refused_by_name(saved_dcp_clip, toy_vit, tmp_path):
    _, path = saved_dcp_clip
    with pytest.raises(ovseg.WeightsError, match="holds 'dcp-clip' weights, not esc-net"):
        ovseg.load("esc-net", backbone=toy_vit, weights=str(path))
    # without the config record beside it, the tensors themselves do not fit
    lone = tmp_path / "lone.safetensors"
    shutil.copy(weights_file(path), lone)
    with pytest.raises(ovseg.WeightsError, match="does not fit ldvc"):
        ovseg.load("ldvc", backbone=toy_vit, weights=str(lone))


# Every head method goes through the same builder (ovseg.methods.builder): small settings each.
BUILDS = {
    "dpseg": ("toy_convnext", {"input_size": 64, "num_templates": 2, "prompts_per_class": 1}),
    "dcp-clip": ("toy_vit", {"input_size": 64, "cost_dim": 32, "window_size": 4}),
    "esc-net": ("toy_vit", {"input_size": 64, "sam_pretrained": False, "window_size": 4}),
    "ldvc": ("toy_vit", {"input_size": 64}),
}


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_every_builder_shares_a_clip_without_weights_and_copies_it_for_weights(
    name, request, tmp_path
):
    fixture, settings = BUILDS[name]
    clip = request.getfixturevalue(fixture)
    untrained = ovseg.load(name, backbone=clip, **settings)
    assert untrained.backbone is clip
    assert not untrained.trained_head
    path = save_weights(untrained, tmp_path / name)
    before = {key: value.clone() for key, value in clip.state_dict().items()}
    trained = ovseg.load(name, backbone=clip, weights=str(path))
    assert trained.trained_head
    assert trained.backbone is not clip
    assert trained.config == untrained.config  # the saved config comes back without repeating it
    after = clip.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    with pytest.raises(WeightsError, match=f"No {name} weights file"):
        ovseg.load(name, backbone=clip, weights=str(tmp_path / "absent"))


def test_settings_that_describe_the_machine_are_not_restored_from_a_record(toy_convnext, tmp_path):
    method = ovseg.load(
        "dpseg",
        backbone=toy_convnext,
        input_size=64,
        num_templates=2,
        prompts_per_class=1,
        class_chunk=3,
        prompt_cache_dir=str(tmp_path / "bank"),
    )
    path = save_weights(method, tmp_path / "dpseg")
    loaded = ovseg.load("dpseg", backbone=toy_convnext, weights=str(path))
    assert (loaded.config.num_templates, loaded.config.prompts_per_class) == (2, 1)
    assert loaded.config.class_chunk == type(loaded.config)().class_chunk
    assert loaded.config.prompt_cache_dir is None
