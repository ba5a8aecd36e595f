"""The demo in a real browser: launch app.py, upload an example, segment, look at the result.

Needs Chromium (Debian's ``chromium``; ``make test`` installs it) and the playwright package.
"""

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
CHROMIUM = os.environ.get("OVSEG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=output,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            process.kill()
            pytest.fail(f"app.py did not answer within 300 s:\n{log.read_text()[-3000:]}")
        yield url
        process.terminate()
        process.wait(timeout=30)


def test_segmenting_an_example_shows_an_overlay_per_method(demo_url, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), (
        f"Chromium not found at {CHROMIUM}; run `make test` to install it"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(demo_url)
        page.get_by_text("ToyWorld examples").wait_for(timeout=60_000)
        page.locator("table tbody tr").first.click()  # an example fills the image and vocabulary
        page.locator("[data-testid='image'] img, .image-container img").first.wait_for(
            timeout=60_000
        )
        page.get_by_role("button", name="Segment").click()
        gallery = page.locator("[data-testid='gallery'] img, .grid-wrap img, .thumbnail-item img")
        gallery.first.wait_for(timeout=300_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        text = page.locator("body").inner_text()
        browser.close()
    # one captioned overlay per method, and the shared legend names the example's classes
    for method in ("dense-clip", "dpseg", "dcp-clip"):
        assert f"{method} · " in text
    assert "Classes:" in text and "carpet" in text
    assert (tmp_path / "demo.png").stat().st_size > 10_000
