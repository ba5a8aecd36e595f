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
