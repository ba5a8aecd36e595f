"""Whatever a user gives ovseg, it answers correctly or refuses in its own words, and loses nothing.

A property-based test throws random vocabularies and images (arrays of any shape and dtype,
encoded files of every mode and format, truncated or random bytes) at a :class:`Predictor`; the
rest are the named cases of the reliability issue: exotic image files, hostile weights files.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import ovseg
from ovseg.backbones import load_backbone
from ovseg.backbones.sam import build_sam
from ovseg.methods.weights import load_weights

# ----------------------------------------------------------------------------- property test

# Any Unicode (controls, combining marks, CJK, emoji) except lone surrogates, which no text has.
ANY_CHARACTER = st.characters(codec="utf-8")
SEPARATORS = st.sampled_from([",", ";", "\n", " ", "\t", ",,", " ; "])
WORDS = st.sampled_from(["cat", "sky", "🐱", "🚲 bike", "草地", "café", "Ωmega", "road", "  "])
NAMES = st.one_of(WORDS, st.text(ANY_CHARACTER, max_size=24))
VOCABULARIES = st.one_of(
    st.lists(st.one_of(ANY_CHARACTER, SEPARATORS, WORDS), max_size=80).map("".join),  # typed
    st.lists(st.one_of(NAMES, st.lists(NAMES, max_size=3)), max_size=40),  # names or synonyms
    st.text(ANY_CHARACTER, min_size=190, max_size=260),  # one very long name
    st.integers(1, 1100).map(lambda n: [f"thing {i % 997}" for i in range(n)]),  # long lists
)

DTYPES = ["uint8", "uint16", "float32", "float64", "bool", "int32", "int64", "complex64"]
PIL_MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I", "F", "YCbCr"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]
# Mostly usable sizes, sometimes below ovseg's 16-pixel minimum (0 included).
SIDES = st.sampled_from([*range(16, 49)] * 4 + [*range(16)])


@st.composite
def arrays(draw) -> np.ndarray:
    """Arrays of any small shape and dtype, with values in and out of range, NaN and infinity."""
    height, width = draw(SIDES), draw(SIDES)
    channels = draw(st.sampled_from([3, 3, 3, 4, None, 1, 2, 5]))
    dtype = np.dtype(draw(st.sampled_from(["uint8", "uint8", "float32", *DTYPES])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (height, width) if channels is None else (height, width, channels)
    if dtype.kind == "f" or dtype.kind == "c":
        array = rng.uniform(-0.5, 1.5, shape).astype(dtype)
        if array.size and draw(st.booleans()):
            array.flat[rng.integers(array.size)] = draw(st.sampled_from([np.nan, np.inf]))
        return array
    if dtype.kind == "b":
        return rng.random(shape) > 0.5
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape).astype(dtype)


@st.composite
def encoded_images(draw) -> bytes:
    """Image files of every mode and format, sometimes cut short or replaced by random bytes."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.integers(0, 9)) == 0:
        return rng.bytes(draw(st.integers(0, 300)))
    height, width = draw(SIDES), draw(SIDES)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mode = draw(st.sampled_from(PIL_MODES))
    image = image.convert(mode)
    buffer = io.BytesIO()
    try:
        if draw(st.booleans()) and mode in ("RGB", "P", "L"):  # animated
            frames = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
            frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
        else:
            image.save(buffer, format=draw(st.sampled_from(FORMATS)))
    except (OSError, ValueError, KeyError):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


@pytest.fixture(scope="module")
def quick_predictor(toy_vit):
    # One template and a small input keep each example fast; the head path is the same code.
    method = ovseg.load("dense-clip", backbone=toy_vit, templates="single", input_size=64)
    return ovseg.Predictor(method)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples in every CI run
    database=None,  # nothing written into the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(image=st.one_of(arrays(), encoded_images()), vocabulary=VOCABULARIES)
def test_any_image_and_vocabulary_give_a_valid_prediction_or_ovsegs_own_error(
    quick_predictor, image, vocabulary
):
    predictor = quick_predictor
    predictor.reset_image()
    try:
        predictor.set_image(image)
    except ovseg.OvsegError as error:
        assert str(error)
        assert predictor.image is None
        event(f"image refused: {type(error).__name__}")
        return
    try:
        prediction = predictor.predict(vocabulary)["dense-clip"]
    except ovseg.OvsegError as error:
        assert str(error)
        event(f"vocabulary refused: {type(error).__name__}")
        return
    event("segmented")
    height, width = predictor.image.shape[:2]
    classes = len(prediction.vocabulary)
    assert predictor.image.dtype == np.uint8 and predictor.image.shape == (height, width, 3)
    assert prediction.label_map.shape == (height, width)
    assert prediction.label_map.min() >= 0 and prediction.label_map.max() < classes
    assert prediction.scores.shape == (classes,) and np.isfinite(prediction.scores).all()
    assert prediction.scores.sum() == pytest.approx(1.0, abs=1e-3)
    assert prediction.areas.sum() == pytest.approx(1.0, abs=1e-6)
    assert all(name.strip() for name in prediction.vocabulary.names)


# ------------------------------------------------------------------------ named image cases


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_a_cmyk_jpeg_reads_as_its_rgb_colours():
    cmyk = Image.new("RGB", (32, 24), (200, 40, 30)).convert("CMYK")
    loaded = ovseg.load_image(_encode(cmyk, "JPEG", quality=95))
    assert loaded.shape == (24, 32, 3)
    assert np.abs(loaded[12, 16].astype(int) - [200, 40, 30]).max() <= 12


def test_an_animated_gif_reads_as_its_first_frame():
    first, second = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    data = _encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    loaded = ovseg.load_image(data)
    assert loaded.shape == (32, 32, 3)
    assert tuple(loaded[16, 16]) == (255, 0, 0)


def test_a_truncated_tiff_is_refused_not_decoded_with_a_warning():
    pixels = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(pixels), "TIFF")
    with pytest.raises(ovseg.ImageError, match="truncated or corrupt"):
        ovseg.load_image(data[: len(data) * 2 // 3])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width×height`` RGB pixels and holds almost no data (a 'bomb')."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ovseg.ImageError, match="the most accepted; it was not decoded"):
        ovseg.load_image(_png_header_only(40_000, 40_000))


def test_a_sixteen_bit_greyscale_png_spans_the_eight_bit_range():
    ramp = (np.linspace(0, 65535, 64, dtype=np.uint16)[None, :].repeat(16, axis=0)).astype(
        np.uint16
    )
    loaded = ovseg.load_image(_encode(Image.fromarray(ramp), "PNG"))
    assert loaded[0, 0, 0] == 0 and loaded[0, -1, 0] == 255


def test_non_ascii_and_emoji_names_survive_into_the_prediction(quick_predictor):
    quick_predictor.set_image(np.full((32, 32, 3), 120, dtype=np.uint8))
    vocabulary = "chat; 猫, 🚲 bicycle, café au lait, Ωmega"
    prediction = quick_predictor.predict(vocabulary)["dense-clip"]
    assert prediction.vocabulary.names == ("chat", "🚲 bicycle", "café au lait", "Ωmega")
    assert prediction.vocabulary.classes[0] == ("chat", "猫")
    assert {c["name"] for c in prediction.summary()["classes"]} <= set(prediction.vocabulary.names)


def test_unknown_methods_and_options_are_ovsegs_own_errors(quick_predictor):
    with pytest.raises(ovseg.UnknownMethodError, match="available"):
        ovseg.load("segformer")
    quick_predictor.set_image(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(ovseg.UnknownMethodError, match="this predictor has"):
        quick_predictor.predict("cat", methods=["dpseg"])
    with pytest.raises(ovseg.OptionError, match="no options"):
        quick_predictor.predict("cat", options={"dense-clip": {"theta": 0.3}})
    quick_predictor.reset_image()
    with pytest.raises(ovseg.NoImageError, match="set_image"):
        quick_predictor.predict("cat")


# ------------------------------------------------------------------------ hostile weights


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_checkpoint(path, marker) -> None:
    """A torch checkpoint whose state dict carries an object that runs code when unpickled."""
    torch.save({"weight": torch.zeros(2), "payload": _Payload(str(marker))}, path)


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_a_clip_checkpoint_with_code_in_it_is_refused_without_running_it(tmp_path, suffix):
    path, marker = tmp_path / f"evil{suffix}", tmp_path / "owned"
    _malicious_checkpoint(path, marker)
    with pytest.raises(ovseg.WeightsError, match="Could not load CLIP"):
        load_backbone("toy-vit", str(path))
    assert not marker.exists()


def test_a_sam_checkpoint_with_code_in_it_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "sam_vit_b_evil.pth", tmp_path / "owned"
    _malicious_checkpoint(path, marker)
    with pytest.raises(ovseg.WeightsError, match="more than tensors"):
        build_sam("toy", path)
    assert not marker.exists()


def test_head_weights_are_safetensors_only_and_a_pickle_in_disguise_is_refused(
    tmp_path, dense_clip
):
    marker = tmp_path / "owned"
    _malicious_checkpoint(tmp_path / "head.safetensors", marker)
    with pytest.raises(ovseg.WeightsError, match="not a readable safetensors file"):
        load_weights(dense_clip, tmp_path / "head.safetensors")
    _malicious_checkpoint(tmp_path / "head.pt", marker)
    with pytest.raises(ovseg.WeightsError, match="No weights file"):
        load_weights(dense_clip, tmp_path / "head.pt")  # only head.pt.safetensors is looked for
    assert not marker.exists()


def test_weights_for_another_clip_are_refused_and_name_what_differs(tmp_path, toy_convnext):
    path = tmp_path / "convnext.pt"
    torch.save(toy_convnext.model.state_dict(), path)
    with pytest.raises(ovseg.WeightsError, match="Could not load CLIP"):
        load_backbone("toy-vit", str(path))
