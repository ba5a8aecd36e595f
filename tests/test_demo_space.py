"""The Hugging Face Space: assemble it with spaces/build.sh and start it like a Space does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_the_assembled_space_starts_and_serves_the_segment_endpoint(tmp_path):
    from gradio_client import Client, handle_file

    space = tmp_path / "space"
    subprocess.run(["bash", str(REPO / "spaces" / "build.sh"), str(space)], check=True)
    front_matter = (space / "README.md").read_text(encoding="utf-8").split("---")[1]
    assert "sdk: gradio" in front_matter and "app_file: app.py" in front_matter
    requirements = (space / "requirements.txt").read_text(encoding="utf-8")
    for package in ("gradio==", "scikit-learn==", "open_clip_torch==", "segment-anything=="):
        assert package in requirements
    port = _free_port()
    # Like a Space: no arguments, configuration from the environment, the Space's own package.
    env = {
        **os.environ,
        "PYTHONPATH": str(space),
        "GRADIO_SERVER_PORT": str(port),
        "OVSEG_METHODS": "dense-clip",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    env.pop("OVSEG_ASSETS", None)
    log = tmp_path / "space.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "app.py"], cwd=space, env=env, stdout=output, stderr=output
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(1)
        client = Client(url, verbose=False)
        gallery, *_ = client.predict(
            handle_file(str(space / "assets" / "examples" / "toyworld-1.png")),
            "carpet, fox",
            "(type your own)",
            ["dense-clip"],
            "each method's own",
            0.5,
            "II",
            0.5,
            ["point"],
            16,
            api_name="/segment",
        )
        assert [item["caption"].split(" · ")[0] for item in gallery] == ["dense-clip"]
    finally:
        process.terminate()
        process.wait(timeout=30)
