"""Trained heads go out as safetensors + JSON config and come back in by path or hub name."""

import shutil

import huggingface_hub
import pytest
import torch

import ovseg
from ovseg.backbones import WeightsError
from ovseg.methods.base import save_weights


@pytest.fixture
def saved_dcp_clip(tmp_path, toy_vit):
    """A DCP-CLIP head with non-default architecture settings, saved the way train.py saves it."""
    method = ovseg.load("dcp-clip", backbone=toy_vit, input_size=64, cost_dim=32, window_size=4)
    with torch.no_grad():
        for parameter in method.parameters():
            parameter.add_(0.01)
    return method, save_weights(method, tmp_path / "heads" / "dcp-clip-custom")


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
