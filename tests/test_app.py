import gradio as gr
import numpy as np
import pytest

from ovseg.demo.app import build_demo, segment


@pytest.fixture(scope="module")
def methods(dense_clip):
    return {"dense-clip": dense_clip}


def test_the_demo_builds_around_loaded_methods(methods):
    demo = build_demo(methods, notes=["a note"])
    assert isinstance(demo, gr.Blocks)


def test_segment_returns_one_overlay_per_method_and_a_class_table(methods, rng):
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    gallery, rows, status, session = segment(
        image, "cat, dog, sky", ["dense-clip"], 0.5, None, methods
    )
    assert len(gallery) == 1
    overlay, caption = gallery[0]
    assert overlay.shape == (64, 96, 3) and caption.startswith("dense-clip")
    assert rows and all(row[0] == "dense-clip" for row in rows)
    assert "cat" in status
    # the same image with a new vocabulary reuses the session's encoded features
    digest = session.image_digest
    segment(image, "tree, car", ["dense-clip"], 0.5, session, methods)
    assert session.image_digest == digest
    assert session.predictor._encode_seconds  # encoded once, kept


@pytest.mark.parametrize(
    ("image", "vocabulary", "chosen", "message"),
    [
        (None, "cat", ["dense-clip"], "Give an image"),
        (np.zeros((32, 32, 3), dtype=np.uint8), " , ", ["dense-clip"], "empty"),
        (np.zeros((32, 32, 3), dtype=np.uint8), "cat", [], "at least one method"),
        (np.zeros((1, 1, 3), dtype=np.uint8), "cat", ["dense-clip"], "1×1"),
    ],
)
def test_bad_input_shows_a_message_in_the_ui(methods, image, vocabulary, chosen, message):
    with pytest.raises(gr.Error, match=message):
        segment(image, vocabulary, chosen, 0.5, None, methods)
