"""The Stable Diffusion prompt-bank script: sharded, resumable, with manifests, and the bank it
fills is the one DPSeg reads (a tiny random diffusers pipeline stands in for SD v1.5)."""

from __future__ import annotations

import json

import pytest
import torch
from test_visual_prompts import tiny_pipeline_folder

import ovseg
from ovseg.vocabulary import load_vocabulary
from training.make_prompt_bank import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bank-config")
    method_config = {
        "backbone": "toy-convnext",
        "pretrained": "random",
        "input_size": 64,
        "num_templates": 2,
        "prompt_generator": str(tiny_pipeline_folder(folder)),
        "prompt_resolution": 32,
    }
    path = folder / "dpseg-tiny.json"
    path.write_text(json.dumps({"method": "dpseg", "method_config": method_config}))
    return path, method_config


def test_shards_fill_the_bank_dpseg_reads_and_the_last_one_writes_the_manifest(
    tmp_path, config_file
):
    path, method_config = config_file
    cache = tmp_path / "bank"
    common = ["--config", str(path), "--vocabulary", "voc-20", "--cache-dir", str(cache)]
    first = main([*common, "--shard", "0", "--num-shards", "2"])
    assert first["images"] == 10 * 2 and first["complete"] == {"voc-20": False}
    assert not (cache / "manifest.json").exists()
    second = main([*common, "--shard", "1", "--num-shards", "2"])
    assert second["complete"] == {"voc-20": True}
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["entries"]) == 20 * 2 and manifest["prompts_per_class"] == 2
    assert {tuple(e["class"]) for e in manifest["entries"]} == set(load_vocabulary("voc-20"))
    assert all((cache / e["image"]).is_file() for e in manifest["entries"])

    # Resumable: a rerun draws nothing new.
    times = {p: p.stat().st_mtime_ns for p in (cache / "images").rglob("*.png")}
    main([*common, "--shard", "0", "--num-shards", "2"])
    assert {p: p.stat().st_mtime_ns for p in (cache / "images").rglob("*.png")} == times

    # DPSeg built from the same settings finds every prompt image cached.
    method = ovseg.load("dpseg", **method_config, prompt_cache_dir=str(cache))
    vocabulary = list(load_vocabulary("voc-20"))
    images = method.prompt_bank.images(vocabulary, list(method.templates), 2, generate=False)
    assert len(images) == 20 and images[0][0].shape == (32, 32, 3)


def test_encode_caches_the_embeddings_too(tmp_path, config_file, monkeypatch):
    path, _ = config_file
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    result = main(
        ["--config", str(path), "--vocabulary", "voc-20", "--cache-dir", str(tmp_path), "--encode"]
    )
    assert result["complete"] == {"voc-20": True} and result["encoder"]
    assert len(list((tmp_path / "embeddings").rglob("*.safetensors"))) == 20 * 2


def test_only_dpseg_configs_are_accepted(tmp_path):
    path = tmp_path / "ldvc.json"
    path.write_text(json.dumps({"method": "ldvc", "method_config": {}}))
    with pytest.raises(SystemExit, match="visual prompts are DPSeg's"):
        main(["--config", str(path), "--vocabulary", "voc-20"])


def test_export_ships_every_class_so_dpseg_draws_nothing_for_known_names(
    tmp_path, config_file, monkeypatch
):
    import ovseg.backbones
    from ovseg.prompts.visual import SHIPPED_TOY_PROMPTS

    path, method_config = config_file
    assets = tmp_path / "assets"
    assets.mkdir()
    # The keys hold a digest of the prompt encoder's weights: the same random CLIP both times.
    torch.manual_seed(0)
    result = main(
        ["--config", str(path), "--vocabulary", "voc-20", "--cache-dir", str(tmp_path / "maker"),
         "--export", str(assets / SHIPPED_TOY_PROMPTS)]
    )  # fmt: skip
    assert result["exported"] == 20 * 2
    monkeypatch.setattr(ovseg.backbones, "ASSETS_DIR", assets)
    # A fresh DPSeg with an empty cache: every voc-20 prompt comes from the shipped file.
    torch.manual_seed(0)
    method = ovseg.load("dpseg", **method_config, prompt_cache_dir=str(tmp_path / "user"))
    vocabulary = list(load_vocabulary("voc-20"))
    prompts = method.prompt_bank.embeddings(vocabulary, list(method.templates), 2, generate=False)
    assert prompts.embeddings.shape[:2] == (20, 2)
    assert not (tmp_path / "user").exists()
    with pytest.raises(SystemExit, match="one shard"):
        main(["--config", str(path), "--vocabulary", "voc-20", "--shard", "0", "--num-shards", "2",
              "--cache-dir", str(tmp_path / "maker"), "--export", str(tmp_path / "x")])  # fmt: skip
