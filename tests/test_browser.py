"""The demo in a real browser: Playwright drives Debian's Chromium against ``app.py`` on localhost.

The app is launched once for the module and one page keeps its session across the tests, which
run in file order (load and segment first). Screenshots go to ``$OVSEG_SCREENSHOTS`` (default: a
pytest temporary folder). Needs Chromium (``make test`` installs it) and the playwright package;
the tests fail rather than skip without them, so CI always runs them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
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
METHODS = ("dense-clip", "dpseg", "dcp-clip", "esc-net", "ldvc")
LONG = 180_000  # ms: the first run encodes the image for every method on a busy CPU
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("OVSEG_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    # Tracebacks through ovseg are bugs (uvicorn's own about closed connections are not).
    assert f'File "{REPO / "ovseg"}' not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"Chromium not found at {CHROMIUM}; run `make test`"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, demo_url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.goto(demo_url)
    page.get_by_text("Examples").first.wait_for(timeout=60_000)
    yield page
    page.close()


def _images(page, elem_id: str, count: int = 1) -> int:
    """Wait until the component shows at least ``count`` loaded images; return how many.

    On a timeout the page is saved as ``timeout-<elem_id>.png`` beside the screenshots.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    locator = page.locator(f"#{elem_id} img")
    try:
        _wait_for_images(page, locator, elem_id, count)
    except PlaywrightTimeout:
        folder = Path(os.environ.get("OVSEG_SCREENSHOTS", tempfile.gettempdir()))
        page.screenshot(path=str(folder / f"timeout-{elem_id}.png"), full_page=True)
        raise
    return locator.count()


def _wait_for_images(page, locator, elem_id: str, count: int) -> None:
    locator.nth(count - 1).wait_for(timeout=LONG)
    page.wait_for_function(
        """([id, count]) => {
            // Only the first ``count``: galleries load images further down lazily.
            const images = [...document.querySelectorAll(`#${id} img`)].slice(0, count);
            return images.length >= count && images.every(i => i.complete && i.naturalWidth > 0);
        }""",
        arg=[elem_id, count],
        timeout=LONG,
    )


def _pick_first_example(page) -> None:
    """Click the first example and wait until it has filled the vocabulary box."""
    from playwright.sync_api import expect

    page.locator("table tbody tr").first.click()
    expect(page.locator("#vocabulary textarea")).to_have_value(
        "carpet, fox, peacock, ant, cheese, fountain, crown, broom, canoe, sneaker", timeout=60_000
    )
    page.locator("[data-testid='image'] img, .image-container img").first.wait_for(timeout=60_000)


def _open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def _results_json_href(page) -> str:
    """The download link of the results JSON; it changes with every finished run."""
    link = page.locator("#downloads a[href$='ovseg-results.json']")
    link.wait_for(timeout=LONG)
    return link.get_attribute("href") or ""


def test_load_and_segment_an_example_shows_every_method(page, screenshots):
    _pick_first_example(page)
    page.locator("#vocabulary textarea").fill("carpet, fox, peacock, ant")
    page.locator("#segment-button").click()
    ldvc_trained = "LDVC has no trained weights" not in page.locator("#method-status").inner_text()
    expected = 5 if ldvc_trained else 4  # without weights LDVC says so instead of an overlay
    assert _images(page, "overlays", expected) == expected
    _results_json_href(page)  # the last step of a run: the downloads are written
    status = page.locator("#run-status").inner_text()
    gallery = page.locator("#overlays").inner_text()
    for method in METHODS[:expected]:
        assert f"{method} · " in gallery and f"{method}:" in status
    if not ldvc_trained:
        assert "ldvc did not run: LDVC has no trained weights here" in status
    legend = page.locator("#legend").inner_text()
    assert all(name in legend for name in ("carpet", "fox", "peacock", "ant"))
    page.screenshot(path=str(screenshots / "segment.png"), full_page=True)


def test_every_tab_renders_its_images(page, screenshots):
    _open_tab(page, "Cost volumes")
    assert _images(page, "cost-gallery", 4) >= 4
    assert _images(page, "fig3-gallery", 3) == 3
    page.screenshot(path=str(screenshots / "cost-volumes.png"), full_page=True)

    _open_tab(page, "Method views")
    _open_tab(page, "DPSeg")
    assert _images(page, "dpseg-passes", 3) == 3
    assert _images(page, "dpseg-prompts", 4) >= 4
    page.screenshot(path=str(screenshots / "dpseg.png"), full_page=True)
    _open_tab(page, "DCP-CLIP")
    assert _images(page, "dcp-labels", 3) == 3
    assert "peacock" in page.locator("#dcp-selection").inner_text()
    page.screenshot(path=str(screenshots / "dcp-clip.png"), full_page=True)
    _open_tab(page, "ESC-Net")
    assert _images(page, "esc-gallery", 2) >= 2
    page.screenshot(path=str(screenshots / "esc-net.png"), full_page=True)
    _open_tab(page, "LDVC")
    note = page.locator("#ldvc-note")
    note.wait_for(timeout=LONG)
    if "no trained weights" not in note.inner_text():  # the trained head has landed
        assert _images(page, "ldvc-attention", 1) >= 1
        assert _images(page, "ldvc-routing", 1) == 1
    page.screenshot(path=str(screenshots / "ldvc.png"), full_page=True)

    _open_tab(page, "Embedding gap")
    assert _images(page, "gap-scatter", 1) == 1
    assert _images(page, "gap-bars", 1) == 1
    assert "Mean cosine to the image" in page.locator("#gap-note").inner_text()
    page.screenshot(path=str(screenshots / "embedding-gap.png"), full_page=True)


def test_a_vocabulary_change_reuses_the_image_and_updates_the_results(page, screenshots):
    _open_tab(page, "Segment")
    before = _results_json_href(page)
    page.locator("#vocabulary textarea").fill("fox, carpet, sky")
    page.locator("#segment-button").click()
    page.wait_for_function(
        """(before) => {
            const link = document.querySelector("#downloads a[href$='ovseg-results.json']");
            return link && link.getAttribute("href") !== before;
        }""",
        arg=before,
        timeout=LONG,
    )
    status = page.locator("#run-status").inner_text()
    assert "image features cached" in status  # no method encoded the image again
    assert "peacock" not in page.locator("#legend").inner_text()
    page.screenshot(path=str(screenshots / "vocabulary-change.png"), full_page=True)


def test_downloads_give_label_maps_overlays_and_json(page, tmp_path):
    links = page.locator("#downloads a")
    names = [links.nth(i).get_attribute("href") or "" for i in range(links.count())]
    assert "ovseg-results.json" in " ".join(names)
    assert any("dense-clip-labels.png" in name for name in names)
    assert any("dpseg-overlay.png" in name for name in names)
    with page.expect_download(timeout=60_000) as download:
        page.locator("#downloads a[href$='ovseg-results.json']").click()
    path = tmp_path / "results.json"
    download.value.save_as(path)
    summary = json.loads(path.read_text())
    assert summary["vocabulary"] == [["fox"], ["carpet"], ["sky"]]
    assert {"dense-clip", "dpseg"} <= set(summary["methods"])
    assert summary["methods"]["dense-clip"]["timings_s"]


def test_bad_input_shows_a_readable_message(browser, demo_url, screenshots):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(demo_url)
    page.locator("#segment-button").wait_for(timeout=60_000)
    page.locator("#segment-button").click()  # no image
    page.get_by_text("Give an image first").first.wait_for(timeout=60_000)
    _pick_first_example(page)
    page.locator("#vocabulary textarea").fill(" , ")
    page.locator("#segment-button").click()
    page.get_by_text("The vocabulary is empty").first.wait_for(timeout=60_000)
    page.screenshot(path=str(screenshots / "bad-input.png"), full_page=True)
    assert "Traceback" not in page.locator("body").inner_text()
    page.close()
