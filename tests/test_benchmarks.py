"""The benchmark scripts run and print their tables (tiny settings; the timings are not checked)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_dcp_clip_efficiency_prints_a_row_per_setting_and_the_growth():
    out = run(
        "benchmarks/dcp_clip_efficiency.py", "--scales", "toy", "--sizes", "1", "5",
        "--thetas", "0", "--repeats", "1", "--threads", "1",
    )  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| toy |")]
    assert len(rows) == 2
    selected = [int(row.split("|")[4]) for row in rows]
    assert selected == [1, 5]  # θ = 0 selects every class
    assert "toy, θ = 0:" in out


def test_parameter_counts_cover_every_toy_method():
    out = run("benchmarks/parameters.py", "--scales", "toy")
    for method in ("dpseg", "dcp-clip", "esc-net", "ldvc"):
        assert f"| {method}, toy" in out


def test_latency_prints_every_stage_for_each_method_and_size():
    out = run(
        "benchmarks/latency.py", "--methods", "dense-clip", "cat-seg-style", "--sizes", "1", "3",
        "--images", "64", "--repeats", "1", "--threads", "1",
    )  # fmt: skip
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| toy |")]
    assert [(row[1].strip(), row[2].strip()) for row in rows] == [
        ("dense-clip", "1"), ("dense-clip", "3"), ("cat-seg-style", "1"), ("cat-seg-style", "3"),
    ]  # fmt: skip
    for row in rows:
        backbone, encode, _text, head, _post, first = (float(cell) for cell in row[5:11])
        # encode and first are separate measurements: comparing them would test the machine's noise
        assert backbone > 0 and encode > 0 and head >= 0 and first > 0


def test_latency_side_by_side_runs_all_five_methods_in_one_predictor():
    out = run(
        "benchmarks/latency.py", "--side-by-side", "--sizes", "2", "--images", "64",
        "--repeats", "1", "--threads", "1",
    )  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| 2 | 64 |")]
    assert len(rows) == 1


def test_latency_text_throughput_prints_prompts_per_second():
    out = run(
        "benchmarks/latency.py", "--text", "--towers", "toy-vit", "--prompts", "100",
        "--threads", "1",
    )  # fmt: skip
    row = next(line for line in out.splitlines() if line.startswith("| toy-vit |"))
    assert float(row.split("|")[3]) > 0


def test_latency_random_text_leaves_the_text_column_empty():
    out = run(
        "benchmarks/latency.py", "--methods", "dense-clip", "--sizes", "2", "--images", "64",
        "--repeats", "1", "--threads", "1", "--random-text", "yes",
    )  # fmt: skip
    row = next(line for line in out.splitlines() if line.startswith("| toy | dense-clip |"))
    assert row.split("|")[8].strip() == "–"


def test_latency_names_the_device_and_refuses_a_gpu_that_is_not_there():
    import torch

    out = run(
        "benchmarks/latency.py", "--methods", "ldvc", "--sizes", "2", "--images", "64",
        "--repeats", "1", "--threads", "1", "--device", "cpu",
    )  # fmt: skip
    assert out.startswith("Device: CPU")
    if torch.cuda.is_available():
        return
    result = subprocess.run(
        [sys.executable, "benchmarks/latency.py", "--device", "cuda"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no CUDA device" in result.stderr


def test_reference_logits_match_themselves_and_report_a_changed_method(tmp_path):
    references = tmp_path / "refs.safetensors"
    case = ("--cases", "ldvc random head")
    run("benchmarks/reference_logits.py", "--save", str(references), *case)
    out = run("benchmarks/reference_logits.py", "--check", str(references), *case)
    assert "| ldvc random head | short | (2, 10, 128, 128) | 0.00e+00 | yes |" in out
    assert "1 of 1 within 1e-06" in out
    from safetensors.torch import load_file, save_file

    changed = load_file(references)
    changed["ldvc random head | short"][0, 0, 0, 0] += 1e-3
    save_file(changed, references)
    result = subprocess.run(
        [sys.executable, "benchmarks/reference_logits.py", "--check", str(references), *case],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 1 and "1.00e-03 | no |" in result.stdout


def test_modality_gap_prints_zero_shot_and_gap_per_clip(tmp_path):
    out = run(
        "benchmarks/modality_gap.py", "toy-vit", "--images-per-class", "2", "--templates",
        "single", "--threads", "1", "--plot", str(tmp_path / "gap.png"),
    )  # fmt: skip
    (row,) = [line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| toy-vit")]
    seen, unseen, image_caption, same, other, _captions, distance, separation = map(float, row)
    assert 0 <= seen <= 100 and 0 <= unseen <= 100
    assert -1 <= other <= same <= 1 and -1 <= image_caption <= 1
    assert distance >= 0 and 0 <= separation <= 1
    assert (tmp_path / "gap.png").stat().st_size > 0
