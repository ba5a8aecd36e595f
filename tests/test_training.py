"""Smoke runs of every training script: a few iterations each, on tiny inputs, in a temp folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "training" / "configs" / "dense-clip-toy.json"
pytestmark = pytest.mark.slow


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [*args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def tiny_training_overrides(run_dir: Path, iterations: int = 2) -> list[str]:
    settings = {
        "iterations": iterations,
        "batch_size": 2,
        "checkpoint_every": 1,
        "method_config.input_size": 64,
        "method_config.pretrained": "random",
        "dataset.image_size": 64,
        "run_dir": str(run_dir),
        "output": str(run_dir / "final"),
        "eval_images": 2,
        "eval_sets": ["toy-seen"],
        "threads": 1,
    }
    return [
        item for key, value in settings.items() for item in ("--set", f"{key}={json.dumps(value)}")
    ]


def test_pretrain_clip_runs_checkpoints_and_writes_an_open_clip_folder(tmp_path):
    out = tmp_path / "clip"
    result = run(
        sys.executable, "training/pretrain_clip.py", "--model", "toy-convnext", "--out", str(out),
        "--run-dir", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4",
        "--checkpoint-every", "1", "--eval-images-per-class", "2", "--eval-templates", "single",
        "--temperature", "0.01",
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["zero_shot_top1_unseen"] <= 100
    assert "zero_shot_top1_seen" in result.stdout
    assert metrics["temperature"] == 0.01 and -1 <= metrics["gap_image_caption"] <= 1
    from safetensors.torch import load_file

    # A fixed temperature is not learned: the logit scale is still 1/τ after two AdamW steps.
    logit_scale = load_file(out / "open_clip_model.safetensors")["logit_scale"].float().exp()
    assert logit_scale.item() == pytest.approx(100, rel=5e-3)
    assert (out / "open_clip_config.json").is_file() and (
        out / "open_clip_model.safetensors"
    ).is_file()
    assert (tmp_path / "run" / "checkpoint.pt").is_file()

    from ovseg.backbones import load_clip

    assert load_clip(f"local-dir:{out}").kind == "convnext"


def test_pretrain_clip_starts_towers_from_another_toy_clip_and_locks_the_text_tower(tmp_path):
    from safetensors.torch import load_file

    tiny = ["--steps", "1", "--batch-size", "4", "--eval-images-per-class", "2"]
    tiny += ["--eval-templates", "single"]
    vit = tmp_path / "vit"
    run(sys.executable, "training/pretrain_clip.py", "--model", "toy-vit", "--out", str(vit),
        "--run-dir", str(tmp_path / "run-vit"), *tiny)  # fmt: skip
    convnext = tmp_path / "convnext"
    run(sys.executable, "training/pretrain_clip.py", "--model", "toy-convnext",
        "--out", str(convnext), "--run-dir", str(tmp_path / "run-convnext"), *tiny)  # fmt: skip
    out = tmp_path / "lit"
    run(
        sys.executable, "training/pretrain_clip.py", "--model", "toy-convnext", "--out", str(out),
        "--run-dir", str(tmp_path / "run-lit"), "--init-text", str(vit), "--init-image",
        str(convnext / "open_clip_model.safetensors"), "--lock-text", "--lr", "0.01",
        "--distill-from", str(vit), "--vocabulary-weight", "1", "--distill-logits-weight", "1",
        *tiny,
    )  # fmt: skip
    source, start, trained = (
        load_file(folder / "open_clip_model.safetensors") for folder in (vit, convnext, out)
    )
    text_keys = [k for k in trained if not k.startswith(("visual.", "logit_"))]
    assert "token_embedding.weight" in text_keys and "text_projection" in text_keys
    assert all(torch.equal(trained[k], source[k]) for k in text_keys)  # copied, then frozen
    stem = next(k for k in trained if k.startswith("visual.") and trained[k].ndim == 4)
    assert trained[stem].shape == start[stem].shape and not torch.equal(trained[stem], start[stem])
    assert (trained[stem] - start[stem]).abs().max() < 0.1  # one step away from its start

    with pytest.raises(AssertionError, match="no image tower matching"):
        run(sys.executable, "training/pretrain_clip.py", "--model", "toy-convnext",
            "--out", str(tmp_path / "bad"), "--run-dir", str(tmp_path / "run-bad"),
            "--init-image", str(vit), *tiny)  # fmt: skip
    with pytest.raises(AssertionError, match="need --lock-text"):  # the vocabulary would drift
        run(sys.executable, "training/pretrain_clip.py", "--model", "toy-convnext",
            "--out", str(tmp_path / "bad"), "--run-dir", str(tmp_path / "run-bad"),
            "--vocabulary-weight", "1", *tiny)  # fmt: skip


def test_pretrain_sam_runs_and_its_weights_load(tmp_path):
    stem = tmp_path / "sam"
    run(
        sys.executable, "training/pretrain_sam.py", "--out", str(stem),
        "--run-dir", str(tmp_path / "run"),
        "--steps", "2", "--scenes", "2", "--prompts-per-scene", "2", "--eval-scenes", "1",
        "--checkpoint-every", "1",
    )  # fmt: skip
    metrics = json.loads((tmp_path / "sam.metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["single_point_miou"] <= 100

    from ovseg.backbones import build_sam

    assert build_sam(None, stem).image_size == 256

    # Calibrate only the IoU head of those weights: nothing else may move.
    calibrated = tmp_path / "calibrated"
    run(
        sys.executable, "training/pretrain_sam.py", "--out", str(calibrated), "--init", str(stem),
        "--train-parts", "iou-head", "--run-dir", str(tmp_path / "run-iou"), "--steps", "2",
        "--scenes", "2", "--prompts-per-scene", "2", "--eval-scenes", "1", "--lr", "0.01",
    )  # fmt: skip
    before = build_sam(None, stem).state_dict()
    after = build_sam(None, calibrated).state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("iou_prediction_head" in name for name in changed)


def test_sam_learns_the_predicted_iou_of_every_mask_not_only_the_best(monkeypatch):
    sys.path.insert(0, str(REPO / "training"))
    from pretrain_sam import train_step

    from ovseg.backbones import build_sam

    sam = build_sam("toy")
    targets = torch.zeros(2, 1, 64, 64)
    targets[:, :, 8:24, 8:24] = 1.0
    logits = torch.randn(2, 3, 64, 64, requires_grad=True)
    predicted_iou = torch.rand(2, 3, requires_grad=True)
    monkeypatch.setattr(sam, "encode_image", lambda pixels: torch.zeros(1, 128, 16, 16))
    monkeypatch.setattr(sam, "decode", lambda *args, **kwargs: (logits, predicted_iou))
    batch = {
        "pixels": torch.zeros(1, 3, 256, 256),
        "row_image": torch.tensor([0, 0]),
        "targets": targets,
        "kind": "points",
        "points": (torch.full((2, 1, 2), 64.0), torch.ones(2, 1)),
    }
    loss, _ = train_step(sam, batch)
    loss.backward()
    assert (predicted_iou.grad != 0).all()  # all three masks of both prompts
    assert ((logits.grad != 0).flatten(2).any(-1).sum(1) == 1).all()  # the mask loss: best only


def test_train_resumes_from_its_checkpoint_and_evaluates(tmp_path):
    run_dir = tmp_path / "run"
    run(
        sys.executable,
        "training/train.py",
        "--config",
        str(CONFIG),
        *tiny_training_overrides(run_dir, 1),
    )
    result = run(
        sys.executable,
        "training/train.py",
        "--config",
        str(CONFIG),
        *tiny_training_overrides(run_dir, 2),
    )
    lines = (run_dir / "train_log.csv").read_text().splitlines()
    assert lines[0].startswith("iteration,loss,loss_ce,lr_clip_attention")
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2"]  # the second run resumed at 1
    assert "| dense-clip | toy-seen | 2 |" in result.stdout
    assert (run_dir / "final.safetensors").is_file()

    import ovseg

    method = ovseg.load(
        "dense-clip", weights=str(run_dir / "final"), pretrained="random", finetune="attention"
    )
    assert method.trained_head


@pytest.mark.parametrize("config", ["dcp-clip-toy", "dpseg-toy", "esc-net-toy", "ldvc-toy"])
def test_every_method_config_trains_through_the_one_trainer(tmp_path, config, monkeypatch):
    monkeypatch.setenv("OVSEG_VISUAL_PROMPT_CACHE", str(tmp_path / "prompts"))
    run_dir = tmp_path / config
    overrides = [*tiny_training_overrides(run_dir, 2), "--set", "classes_per_step=8"]
    path = REPO / "training" / "configs" / f"{config}.json"
    result = run(sys.executable, "training/train.py", "--config", str(path), *overrides)
    lines = (run_dir / "train_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2"]
    assert all(float(line.split(",")[1]) > 0 for line in lines[1:])
    assert (run_dir / "final.safetensors").is_file()
    assert "| toy-seen | 2 |" in result.stdout


def test_train_runs_distributed_on_two_cpu_processes_with_gloo(tmp_path):
    run_dir = tmp_path / "ddp"
    result = run(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "training/train.py", "--config", str(CONFIG), *tiny_training_overrides(run_dir, 2),
    )  # fmt: skip
    assert (run_dir / "final.safetensors").is_file()
    assert "| dense-clip | toy-seen |" in result.stdout


def test_evaluate_prints_the_metric_table(tmp_path):
    from training.evaluate import main

    rows = main(
        ["--method", "dense-clip", "--pretrained", "random", "--sets", "toy-seen", "toy-open",
         "--num-images", "2", "--json", str(tmp_path / "rows.json")]
    )  # fmt: skip
    assert [row["set"] for row in rows] == ["toy-seen", "toy-open"]
    assert "hIoU" in rows[1] and "hIoU" not in rows[0]
    assert json.loads((tmp_path / "rows.json").read_text()) == rows


def test_evaluate_sets_method_config_fields_for_inference_ablations():
    from training.evaluate import main

    rows = main(
        ["--method", "dense-clip", "--pretrained", "random", "--sets", "toy-seen",
         "--num-images", "1", "--set", 'dense_mode="standard"', "--set", "temperature=0.5",
         "--label", "dense-clip (standard tokens)"]
    )  # fmt: skip
    assert rows[0]["method"] == "dense-clip (standard tokens)"
    with pytest.raises(ValueError, match="no option"):
        main(["--method", "dense-clip", "--pretrained", "random", "--set", "nonsense=1"])


def test_a_time_budget_stops_training_early_and_a_rerun_does_not_train_past_it(tmp_path):
    run_dir = tmp_path / "timed"
    overrides = [*tiny_training_overrides(run_dir, 100_000), "--set", "minutes=0.05"]
    run(sys.executable, "training/train.py", "--config", str(CONFIG), *overrides)

    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    stopped = int(state["iteration"])
    assert 1 <= stopped < 100_000
    assert float(state["seconds"]) >= 0.05 * 60
    run(sys.executable, "training/train.py", "--config", str(CONFIG), *overrides)
    assert int(torch.load(run_dir / "checkpoint.pt", weights_only=True)["iteration"]) == stopped


def test_the_learning_rate_decays_over_whichever_budget_runs_out_first():
    from training.train import TrainConfig, learning_rate_factor

    config = TrainConfig(method="dense-clip", iterations=1000, warmup=1, minutes=10)
    assert learning_rate_factor(config, 0, 0.0) == pytest.approx(1.0)
    halfway_by_time = learning_rate_factor(config, 10, 300.0)
    assert halfway_by_time == pytest.approx(0.5, abs=1e-9)
    assert learning_rate_factor(config, 500, 0.0) == pytest.approx(0.5, abs=1e-9)
    assert learning_rate_factor(config, 10, 600.0) == pytest.approx(0.0, abs=1e-12)


def test_a_resumed_run_continues_the_scene_stream_it_left_however_far_it_got():
    import itertools

    from training.train import build_dataset

    spec = {"name": "toyworld", "image_size": 32}
    fresh, _, _ = build_dataset(spec, seed=3)
    resumed, _, _ = build_dataset(spec, seed=3, start=5)
    expected = list(itertools.islice(iter(fresh), 7))[5:]
    for want, got in zip(expected, itertools.islice(iter(resumed), 2), strict=True):
        assert torch.equal(want["image"], got["image"]) and want["caption"] == got["caption"]
    # 6,000 iterations of batch 4 on 8 ranks stays inside the training seeds (resuming at
    # iteration 1,000 used to ask for seed 10**9 and fail).
    late, _, _ = build_dataset(spec, seed=3, start=6000 * 4 * 8)
    assert next(iter(late))["labels"].shape == (32, 32)


def test_training_on_all_312_toyworld_classes_is_refused_not_silently_wrong():
    """Class 255 would share its index with the unlabelled-pixel mark."""
    from training.train import build_dataset

    with pytest.raises(ValueError, match="limits training to 255"):
        build_dataset({"name": "toyworld", "split": "all", "image_size": 32}, seed=0)


def test_the_distillation_loss_is_zero_for_the_teachers_own_embeddings():
    sys.path.insert(0, str(REPO / "training"))
    from pretrain_clip import distillation_loss

    from ovseg.backbones import load_backbone

    teacher = load_backbone("toy-vit", "random").eval()
    pixels = torch.rand(3, 3, 96, 96)  # the teacher sees them at its own 64 px
    small = torch.nn.functional.interpolate(pixels, (64, 64), mode="bilinear", antialias=True)
    with torch.no_grad():
        own = teacher.encode_image(teacher.normalize(small)).global_embedding
    assert distillation_loss(own * 3, teacher, pixels).item() < 1e-5  # cosine ignores the scale
    student = torch.randn(3, own.shape[-1], requires_grad=True)
    loss = distillation_loss(student, teacher, pixels)
    loss.backward()
    assert 0 < loss.item() < 2 and student.grad.abs().sum() > 0


def test_the_vocabulary_losses_reward_the_right_class_and_the_teachers_distribution():
    sys.path.insert(0, str(REPO / "training"))
    from pretrain_clip import vocabulary_losses

    torch.manual_seed(0)
    vocabulary = torch.nn.functional.normalize(torch.randn(10, 16), dim=-1)
    keys = torch.tensor([3, 7, -1, -2])  # two single-class images, two scenes
    scale = torch.tensor(50.0)
    right = torch.cat([vocabulary[[3, 7]], torch.randn(2, 16)]) * 2
    wrong = torch.cat([vocabulary[[4, 1]], right[2:]])
    right_ce, no_kl = vocabulary_losses(right, vocabulary, keys, scale)
    wrong_ce, _ = vocabulary_losses(wrong, vocabulary, keys, scale)
    assert right_ce.item() < 0.1 < 10 < wrong_ce.item() and no_kl.item() == 0
    # Only the single-class images count: scenes change nothing, and a batch of scenes gives 0.
    shuffled = torch.cat([right[:2], torch.randn(2, 16)])
    assert vocabulary_losses(shuffled, vocabulary, keys, scale)[0].item() == right_ce.item()
    scenes = vocabulary_losses(right, vocabulary, torch.tensor([-1, -2, -3, -4]), scale)[0]
    assert scenes.item() == 0

    student = torch.randn(4, 16, requires_grad=True)
    _, self_kl = vocabulary_losses(student, vocabulary, keys, scale, student.detach() * 5)
    assert abs(self_kl.item()) < 1e-5  # the teacher's own distribution (scale-free embeddings)
    cross_entropy, kl = vocabulary_losses(student, vocabulary, keys, scale, torch.randn(4, 16))
    (cross_entropy + kl).backward()
    assert kl.item() > 0 and student.grad.abs().sum() > 0


def test_the_accelerator_command_trains_a_head_into_one_folder(tmp_path):
    """The CPU half of training/accelerator.py: a shipped recipe under a time budget, a step cap,
    weights, log, evaluation and summary in one folder."""
    out = tmp_path / "ldvc"
    run(
        sys.executable, "training/accelerator.py", "ldvc", "--minutes", "5", "--steps", "2",
        "--out", str(out), "--device", "cpu", "--threads", "1",
        "--set", "batch_size=2", "--set", "classes_per_step=4",
        "--set", "method_config.input_size=64", "--set", "dataset.image_size=64",
        "--set", "eval_images=2", "--set", 'eval_sets=["toy-seen"]',
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["returncode"] == 0 and summary["steps"] == 2
    assert summary["scenes_per_step"] == 2 and summary["scenes_per_second"] > 0
    assert summary["machine"]["cuda"] == torch.cuda.is_available()
    assert summary["evaluation"][0]["set"] == "toy-seen"
    assert (out / "model" / "ldvc.safetensors").is_file()
    assert (out / "run" / "train_log.csv").is_file() and (out / "train.log").is_file()
    config = json.loads((out / "run" / "config.json").read_text())
    assert config["device"] == "cpu" and config["num_workers"] == 0 and config["minutes"] == 5


def test_the_accelerator_command_runs_a_pretraining_recipe_with_its_own_batch(tmp_path):
    out = tmp_path / "sam"
    run(
        sys.executable, "training/accelerator.py", "sam", "--minutes", "5", "--steps", "2",
        "--out", str(out), "--device", "cpu", "--batch", "2",
        "--", "--prompts-per-scene", "2", "--eval-scenes", "1",
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["scenes_per_step"] == 2
    assert 0 <= summary["evaluation"]["single_point_miou"] <= 100
    assert (out / "model" / "sam.safetensors").is_file()


def test_every_recipe_names_an_existing_script_and_puts_everything_under_one_folder(tmp_path):
    from training.recipes import RECIPES

    assert {
        "clip-vit",
        "clip-convnext",
        "clip-convnext-kd",
        "sam",
        "diffusion",
        "dpseg",
        "ldvc",
    } <= set(RECIPES)
    for recipe in RECIPES.values():
        command = recipe.command(tmp_path, steps=3, threads=2, device="cpu")
        assert (REPO / command[0]).is_file()
        assert recipe.scenes_per_step() > 0
        assert command[command.index("--device") + 1] == "cpu"
        paths = [part for part in command if str(tmp_path) in part]
        assert paths and all(str(tmp_path) in part for part in paths)
        if recipe.is_head:
            assert (REPO / command[2]).is_file()
            assert "iterations=3" in command and "minutes=null" in command
        else:
            assert command[command.index("--steps") + 1] == "3"
