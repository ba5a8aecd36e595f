import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_space_builder_assembles_a_self_contained_space(tmp_path):
    out = tmp_path / "space"
    subprocess.run(
        ["bash", str(REPO / "spaces" / "build.sh"), str(out)], check=True, capture_output=True
    )
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio" in readme and "app_file: app.py" in readme
    assert (out / "app.py").is_file() and (out / "requirements.txt").is_file()
    assert (out / "ovseg" / "predictor.py").is_file()
    assert (out / "assets" / "clip-toy-vit" / "open_clip_model.safetensors").is_file()
    assert not list(out.rglob("__pycache__"))
    # the Space's package finds the Space's assets, not the repository's
    probe = "from ovseg.backbones import ASSETS_DIR; print(ASSETS_DIR)"
    env = {**os.environ, "PYTHONPATH": str(out)}
    env.pop("OVSEG_ASSETS", None)
    printed = subprocess.run(
        [sys.executable, "-c", probe], cwd=out, capture_output=True, text=True, env=env, check=True
    )
    assert printed.stdout.strip() == str(out / "assets")
