import io

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.images import MAX_SIDE, ImageError, crop_class_region, load_image


def _png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def test_rgba_is_composited_over_white():
    image = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    array = load_image(image)
    assert array.shape == (20, 20, 3) and array.dtype == np.uint8
    assert tuple(array[0, 0]) == (255, 0, 0)
    assert tuple(array[5, 5]) == (255, 255, 255)


def test_greyscale_and_palette_images_become_rgb():
    assert load_image(Image.new("L", (20, 30), 77))[0, 0].tolist() == [77, 77, 77]
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([10, 20, 30] * 256)
    assert load_image(palette)[0, 0].tolist() == [10, 20, 30]


def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path):
    array16 = np.full((20, 20), 65535, dtype=np.uint16)
    array16[0, 0] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(array16).save(path)
    loaded = load_image(path)
    assert loaded[1, 1].tolist() == [255, 255, 255] and loaded[0, 0].tolist() == [0, 0, 0]
    assert load_image(array16)[1, 1].tolist() == [255, 255, 255]


def test_float_arrays_in_unit_range_are_accepted_and_nan_refused():
    assert load_image(np.full((20, 20, 3), 0.5))[0, 0].tolist() == [128, 128, 128]
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((20, 20, 3), np.nan))


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    loaded = load_image(_png_bytes(image, format="JPEG", exif=exif.tobytes()))
    assert loaded.shape == (40, 20, 3)


def test_a_one_pixel_image_is_refused_clearly():
    with pytest.raises(ImageError, match="1×1 pixels"):
        load_image(Image.new("RGB", (1, 1)))


def test_a_huge_image_is_shrunk_not_refused(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (10_000, 10_000), (30, 200, 40)).save(path, quality=50)
    loaded = load_image(path)
    assert max(loaded.shape[:2]) == MAX_SIDE
    assert np.abs(loaded[100, 100].astype(int) - [30, 200, 40]).max() <= 3


def test_a_non_image_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(ImageError, match="not an image"):
        load_image(path)


def test_a_truncated_image_is_a_clear_error():
    data = _png_bytes(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    )
    with pytest.raises(ImageError, match=r"truncated or corrupt|not an image"):
        load_image(data[: len(data) // 2])


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ImageError, match="No image file"):
        load_image(tmp_path / "missing.png")


def test_odd_array_shapes_are_refused():
    with pytest.raises(ImageError, match="H×W"):
        load_image(np.zeros((20, 20, 2), dtype=np.uint8))


def test_masked_crop_holds_only_the_class_pixels_and_fill():
    generator = torch.Generator().manual_seed(5)
    image = torch.rand(3, 20, 20, generator=generator)
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[3:9, 4:16] = torch.rand(6, 12, generator=generator) > 0.5
    mask[3, 4] = mask[8, 15] = True  # the tight box is rows 3-8, columns 4-15
    fill = torch.tensor([0.1, 0.2, 0.3])
    crop = crop_class_region(image, mask, size=12, fill=fill, mode="masked")
    expected = fill.view(3, 1, 1).expand(3, 12, 12).clone()
    expected[:, 3:9] = torch.where(mask[3:9, 4:16], image[:, 3:9, 4:16], fill.view(3, 1, 1))
    assert torch.equal(crop, expected)
    boxed = crop_class_region(image, mask, size=12, fill=fill, mode="bbox")
    assert torch.equal(boxed[:, 3:9], image[:, 3:9, 4:16])
    assert crop_class_region(image, mask, size=32, fill=fill).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="empty"):
        crop_class_region(image, torch.zeros(20, 20, dtype=torch.bool), size=8, fill=fill)
