"""The demo as a server: many sessions at once, their files, and what it refuses to serve.

The load test runs ``benchmarks/load_test.py``'s driver against the demo served in this process
with the shipped ToyWorld weights: 20 sessions, each with its own scene and vocabulary, for a
bounded time, with fewer session slots than sessions so that Gradio evicts and sessions rebuild.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ovseg
from ovseg.demo import gradio_fixes
from ovseg.demo.examples import EXAMPLES_DIR, PRESET_CUSTOM
from ovseg.demo.session import RunOptions, ScratchSpace, Session
from ovseg.demo.settings import argument_parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import load_test

SESSIONS = 20
SESSION_SLOTS = 8  # fewer than SESSIONS: Gradio evicts sessions, which must rebuild cleanly
SECONDS = 30
# Memory may grow while allocator pools settle, but not with the number of requests served.
RSS_GROWTH_LIMIT_MB = 300


@pytest.fixture(scope="module")
def served():
    demo, url, models = load_test.serve(
        ["dense-clip", "ldvc"], concurrency=1, max_sessions=SESSION_SLOTS
    )
    try:
        yield demo, url, models
    finally:
        demo.close()


@pytest.mark.slow
def test_twenty_sessions_at_once_each_get_their_own_answer(served, tmp_path):
    demo, url, models = served
    methods = ["dense-clip", "ldvc"]
    visitors = load_test.make_visitors(SESSIONS, tmp_path)
    assert len({v.vocabulary for v in visitors}) == SESSIONS  # every session asks something else
    load_test.expected_answers(visitors, models, methods)
    result = load_test.drive(url, visitors, methods, SECONDS, scratch_root=demo.scratch_space.root)
    print(load_test.report(result, methods=methods, concurrency=1, max_sessions=SESSION_SLOTS))
    assert not result.failures, result.failures[:5]
    assert not result.mismatches, result.mismatches[:5]
    assert all(count >= 1 for count in result.answers_per_visitor.values())
    assert result.requests >= SESSIONS
    rss = [mb for _, mb in result.rss_mb]
    assert rss[-1] - result.rss_after_first_round_mb < RSS_GROWTH_LIMIT_MB
    # Evicted sessions take their folders with them: never more than the slots (+ the request
    # in flight, whose session was evicted under it).
    assert result.session_folders_end <= SESSION_SLOTS + 1


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_files_outside_gradios_cache_are_not_served(served, tmp_path):
    demo, url, _ = served
    session = Session.create({"dense-clip": served[2]["dense-clip"]}, demo.scratch_space)
    session.set_image(EXAMPLES_DIR / "toyworld-1.png")
    session.vocabulary = ovseg.parse_vocabulary("sky, grass")
    session.run("dense-clip", session.vocabulary, RunOptions())
    own_file = session.write_downloads(0.5)[0]
    for path in (
        "/etc/passwd",
        "../../../../etc/passwd",
        "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        own_file,  # another session's download, by its real path
        str(Path("README.md").resolve()),
    ):
        status, body = _get(f"{url}gradio_api/file={path}")
        assert status in (403, 404), (path, status)
        assert b"root:" not in body
    session.close()


def test_a_server_path_sent_as_the_image_is_refused(served):
    _, url, _ = served
    payload = {
        "data": [
            {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
            "cat, dog",
            PRESET_CUSTOM,
            ["dense-clip"],
            load_test.METHOD_DEFAULT_SIZE,
            0.5,
            "II",
            0.5,
            ["point"],
            16,
        ]
    }
    request = urllib.request.Request(
        f"{url}gradio_api/call/segment",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        event = json.loads(response.read())["event_id"]
    _, body = _get(f"{url}gradio_api/call/segment/{event}")
    assert b"event: error" in body
    assert b"root:" not in body


def test_the_demo_listens_on_loopback_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert argument_parser().parse_args([]).host == "127.0.0.1"
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # what Hugging Face Spaces set
    assert argument_parser().parse_args([]).host == "0.0.0.0"
    assert argument_parser().parse_args(["--host", "10.1.2.3"]).host == "10.1.2.3"


# ------------------------------------------------------------------------- session files


@pytest.fixture
def dense_session_models(dense_clip):
    return {"dense-clip": dense_clip}


def _segmented(models, space, vocabulary="sky, grass") -> Session:
    session = Session.create(models, space)
    session.set_image(EXAMPLES_DIR / "toyworld-1.png")
    session.vocabulary = ovseg.parse_vocabulary(vocabulary)
    session.run("dense-clip", session.vocabulary, RunOptions())
    return session


def test_each_session_writes_only_into_its_own_folder(dense_session_models, tmp_path):
    space = ScratchSpace(tmp_path)
    first = _segmented(dense_session_models, space)
    second = _segmented(dense_session_models, space, "../../etc/passwd, sky, /tmp/x")
    first_files = first.write_downloads(0.5)
    second_files = second.write_downloads(0.5)
    assert first.scratch != second.scratch
    assert first.scratch.parent == second.scratch.parent == space.root
    for session, files in ((first, first_files), (second, second_files)):
        for path in files:
            resolved = Path(path).resolve()
            assert resolved.is_relative_to(session.scratch.resolve())
            assert Path(path).name in {
                "ovseg-results.json",
                "dense-clip-labels.png",
                "dense-clip-overlay.png",
            }
    # A new run replaces the session's earlier files instead of piling up.
    first.write_downloads(0.3)
    assert len(list(first.scratch.glob("run-*"))) == 1


def test_a_session_folder_goes_when_the_session_ends_or_is_dropped(dense_session_models, tmp_path):
    space = ScratchSpace(tmp_path)
    closed = _segmented(dense_session_models, space)
    closed.write_downloads(0.5)
    folder = closed.scratch
    closed.close()  # Gradio's delete_callback: the tab was closed, or the session expired
    assert not folder.exists()
    dropped = _segmented(dense_session_models, space)
    dropped.write_downloads(0.5)
    folder = dropped.scratch
    del dropped  # Gradio evicting a session calls no callback: collecting it cleans up
    gc.collect()
    assert not folder.exists()
    space.remove()  # at exit
    assert not space.root.exists()


def test_sessions_made_without_a_space_share_one_temporary_root():
    from ovseg.demo.session import default_scratch_space

    root = default_scratch_space().root
    assert root.is_dir() and root.parent == Path(tempfile.gettempdir())
    assert default_scratch_space() is default_scratch_space()


def test_gradios_image_cache_keeps_a_file_that_is_being_served(tmp_path):
    """The fix for Gradio rewriting a cached image in place while it is downloaded."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    path = Path(gradio_fixes.save_pil_to_cache(image, str(tmp_path)))
    data = path.read_bytes()
    with path.open("rb") as reader:  # a download in progress
        inode = path.stat().st_ino
        again = gradio_fixes.save_pil_to_cache(image, str(tmp_path))
        assert Path(again) == path and path.stat().st_ino == inode  # not rewritten
        assert reader.read() == data
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    gradio_fixes.install()
    from gradio import processing_utils

    assert processing_utils.save_pil_to_cache is gradio_fixes.save_pil_to_cache
    assert Path(processing_utils.save_img_array_to_cache(np.asarray(image), str(tmp_path))) == path
