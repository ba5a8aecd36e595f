import json

import numpy as np
import pytest
from PIL import Image

from ovseg.cli import main


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "scene.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
    return path


def test_segment_writes_a_label_png_an_overlay_and_a_summary(tmp_path, image_path, capsys):
    out = tmp_path / "out" / "mask.png"
    code = main(
        [
            "segment", str(image_path), "--vocab", "cat, dog; puppy, sky",
            "--backbone", "toy-vit", "--pretrained", "random", "--input-size", "64",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    labels = np.asarray(Image.open(out))
    assert labels.shape == (60, 80) and labels.max() < 3
    assert Image.open(tmp_path / "out" / "mask_overlay.png").size == (80, 60)
    summary = json.loads((tmp_path / "out" / "mask.json").read_text())
    assert summary["vocabulary"] == ["cat", "dog", "sky"]
    assert summary["method"] == "dense-clip"
    assert "wrote" in capsys.readouterr().out


def test_a_bundled_vocabulary_with_more_than_256_classes_writes_16_bit_labels(tmp_path, image_path):
    out = tmp_path / "mask.png"
    args = ["segment", str(image_path), "--vocab-name", "pc-459", "--backbone", "toy-vit"]
    args += [
        "--pretrained",
        "random",
        "--input-size",
        "32",
        "--templates",
        "single",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert np.asarray(Image.open(out)).dtype == np.uint16 or Image.open(out).mode.startswith("I")


@pytest.mark.parametrize(
    ("vocab", "image_name", "message"),
    [
        (" , ", "scene.png", "vocabulary is empty"),
        ("cat", "missing.png", "No image file"),
    ],
)
def test_bad_input_exits_with_a_message_not_a_traceback(
    tmp_path, image_path, capsys, vocab, image_name, message
):
    args = ["segment", str(tmp_path / image_name), "--vocab", vocab, "--backbone", "toy-vit"]
    args += ["--pretrained", "random", "--out", str(tmp_path / "mask.png")]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_method_is_named(tmp_path, image_path, capsys):
    args = [
        "segment",
        str(image_path),
        "--vocab",
        "cat",
        "--method",
        "nope",
        "--out",
        str(tmp_path / "m.png"),
    ]
    assert main(args) == 2
    assert "Unknown method 'nope'" in capsys.readouterr().err
