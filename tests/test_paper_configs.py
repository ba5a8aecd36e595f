"""The paper configurations: real model names, and a few CPU training steps of each on a fake
copy of its dataset with random toy weights through the one trainer."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
from test_datasets import write_fake_dataset
from test_visual_prompts import tiny_pipeline_folder

from ovseg.backbones.sam import SAM_CONFIGS
from ovseg.data.datasets import BENCHMARKS
from ovseg.prompts.visual import DEFAULT_SD_MODEL
from training.train import TrainConfig, main

PAPER_DIR = Path(__file__).resolve().parents[1] / "training" / "configs" / "paper"
CONFIGS = sorted(path.stem for path in PAPER_DIR.glob("*.json"))
TOY_BACKBONES = {"dpseg": "toy-convnext"}


def test_there_is_one_config_per_method_and_backbone_of_the_papers():
    assert CONFIGS == [
        "dcp-clip-vit-b-16-384",
        "dcp-clip-vit-l-14-336",
        "dpseg-convnext-b-768",
        "dpseg-convnext-l-768",
        "esc-net-vit-b-16-336",
        "esc-net-vit-l-14-336",
        "ldvc-vit-b-16-512-coco-stuff",
        "ldvc-vit-b-16-512-voc",
    ]


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_configs_name_real_weights_and_the_paper_settings(name):
    config = TrainConfig.from_file(PAPER_DIR / f"{name}.json", [])
    model = config.method_config
    assert model["backbone"] in open_clip.list_models()
    assert model["pretrained"] in open_clip.list_pretrained_tags_by_model(model["backbone"])
    assert config.eval_sets == [] and config.base_lr == 2e-4
    crop = config.dataset["crop_size"]
    if config.method == "dpseg":
        assert model["input_size"] == crop == 768 and config.iterations == 80_000
        assert model["prompt_generator"] == DEFAULT_SD_MODEL
        assert model["templates"] == "imagenet"  # 80 templates, one SD image each
    if config.method in ("dcp-clip", "esc-net"):
        assert crop == 384 and config.iterations == 80_000 and config.batch_size == 1
    if config.method == "esc-net":
        assert model["input_size"] == 336 and model["sam"] in SAM_CONFIGS
        assert model["sam_checkpoint"] == "checkpoints/sam_vit_b_01ec64.pth"
    if config.method == "ldvc":
        assert model["input_size"] == crop == 512 and config.dataset["zero_shot"]
        voc = config.dataset["name"] == "pascal-voc-20"
        assert model["visual_prompt_tokens"] == (40 if voc else 100)
        assert config.iterations == (20_000 if voc else 80_000) and config.schedule == "poly"


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory) -> Path:
    return tiny_pipeline_folder(tmp_path_factory.mktemp("sd"))


def smoke_overrides(name: str, config: TrainConfig, tmp_path: Path, sd_pipeline: Path) -> list[str]:
    """Tiny inputs, toy random backbones, the fake dataset and two steps; everything else (the
    method's head settings, templates, losses, optimiser groups, schedule) as in the paper."""
    settings = {
        "iterations": 2,
        "batch_size": 1,
        "checkpoint_every": 1,
        "classes_per_step": 4,
        "threads": 1,
        "amp": "off",
        "run_dir": str(tmp_path / "run"),
        "output": str(tmp_path / "run" / "final"),
        "method_config.backbone": TOY_BACKBONES.get(config.method, "toy-vit"),
        "method_config.pretrained": "random",
        "method_config.input_size": 64,
        "dataset.root": str(tmp_path / "datasets"),
        "dataset.crop_size": 64,
        "dataset.short_side": 64,
        "dataset.max_size": 128,
    }
    if config.method == "dpseg":
        settings |= {
            "method_config.num_templates": 2,
            "method_config.prompt_generator": str(sd_pipeline),
            "method_config.prompt_resolution": 32,
            "method_config.prompt_cache_dir": str(tmp_path / "prompts"),
        }
    if config.method == "esc-net":
        # a 7×7 patch grid, which ViT-B/16's 7-cell windows tile exactly
        settings |= {
            "method_config.sam": "toy",
            "method_config.sam_checkpoint": None,
            "method_config.input_size": 56,
        }
    return [
        item for key, value in settings.items() for item in ("--set", f"{key}={json.dumps(value)}")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_each_paper_config_trains_on_its_fake_dataset(tmp_path, name, sd_pipeline):
    path = PAPER_DIR / f"{name}.json"
    config = TrainConfig.from_file(path, [])
    spec = config.dataset
    write_fake_dataset(
        tmp_path / "datasets", spec["name"], layout=spec["layout"], split=spec["split"], count=2
    )
    results = main(["--config", str(path), *smoke_overrides(name, config, tmp_path, sd_pipeline)])
    assert results["iterations"] == 2
    lines = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2"]
    assert all(float(line.split(",")[1]) > 0 for line in lines[1:])
    saved = json.loads((tmp_path / "run" / "final.json").read_text())
    assert saved["method"] == config.method
    assert Path(results["weights"]).is_file()


@pytest.mark.slow
def test_benchmark_mode_prints_the_paper_table_on_all_five_benchmarks_and_a_zero_shot_split(
    tmp_path, capsys
):
    from training.evaluate import main as evaluate

    root = tmp_path / "datasets"
    for name in BENCHMARKS:
        write_fake_dataset(root, name, count=1)
    write_fake_dataset(root, "pascal-voc-20", layout="mmseg", split="val", count=1)
    config = tmp_path / "dense-clip-tiny.json"
    method_config = {"backbone": "toy-vit", "pretrained": "random", "input_size": 32}
    method_config["templates"] = "single"
    config.write_text(json.dumps({"method": "dense-clip", "method_config": method_config}))
    rows = evaluate(
        ["--config", str(config), "--benchmarks", "all", "--zero-shot", "pascal-voc-20",
         "--datasets-root", str(root), "--paper", "ldvc-vit-b-16-512-voc",
         "--json", str(tmp_path / "rows.json")]
    )  # fmt: skip
    assert [row["set"] for row in rows] == ["A-847", "PC-459", "A-150", "PC-59", "PAS-20", "PAS-20"]
    assert all(0 <= row["mIoU"] <= 100 and row["images"] == 1 for row in rows)
    assert "hIoU" in rows[-1] and "hIoU" not in rows[0]
    table = capsys.readouterr().out
    assert "|  | A-847 | PC-459 | A-150 | PC-59 | PAS-20 | PAS-20 mIoU(S)" in table
    assert "| paper | – | – | – | – | – | 92.5 | 82.3 | 87.2 |" in table
    assert json.loads((tmp_path / "rows.json").read_text()) == rows


def test_every_paper_config_has_the_papers_numbers_to_compare_with():
    from training.evaluate import PAPER_RESULTS

    assert sorted(PAPER_RESULTS) == CONFIGS
    assert PAPER_RESULTS["dcp-clip-vit-b-16-384"] == dict(
        zip(BENCHMARKS, (12.3, 19.7, 32.4, 58.1, 95.9), strict=True)
    )
