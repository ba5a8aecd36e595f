"""Reading user images (any file or array a person might give, checked and turned into RGB), and
cutting a region out of an image tensor."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ovseg.errors import OvsegError

MIN_SIDE = 16
MAX_SIDE = 2048
# Far above any photo, below what would exhaust memory while decoding
# (a 20,000² RGB image is 1.2 GB).
MAX_PIXELS = 400_000_000

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray


class ImageError(OvsegError, ValueError):
    """An image that cannot be used, with a message meant for the person who gave it."""


def load_image(source: ImageSource, *, max_side: int = MAX_SIDE) -> np.ndarray:
    """Read an image into an ``H×W×3`` uint8 RGB array.

    Accepts a path, encoded bytes, a PIL image or an array (``H×W``, ``H×W×1``, ``H×W×3`` or
    ``H×W×4``; uint8, uint16 or float in [0, 1]). EXIF orientation is applied; alpha is composited
    over white; 16-bit and float images are scaled to 8 bits. Images larger than ``max_side`` are
    shrunk (aspect kept); images smaller than ``MIN_SIDE`` on a side are refused.

    Raises:
        ImageError: the file is missing or not an image, or the image is too small or too large.
    """
    if isinstance(source, np.ndarray):
        image = _array_to_pil(source)
    elif isinstance(source, Image.Image):
        image = source
    else:
        image = _open(source, max_side)
    image = ImageOps.exif_transpose(image)
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"The image is {width}×{height} pixels; ovseg needs at least {MIN_SIDE}×{MIN_SIDE}."
        )
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        image = _to_rgb(image)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(_to_rgb(image)).copy()


def _open(source: str | os.PathLike | bytes, max_side: int) -> Image.Image:
    if isinstance(source, bytes):
        stream, name = io.BytesIO(source), "the uploaded data"
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"No image file at {path}.")
        stream, name = path, str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # Some decoders (TIFF) only warn when the data ends early; a short file is an error.
        warnings.filterwarnings("error", message="Truncated File Read")
        previous_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            image = Image.open(stream)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(
                    f"{name} is {width}×{height}; at most {MAX_PIXELS:,} pixels are accepted."
                )
            if max(width, height) > max_side:
                # JPEG can decode straight to a reduced size, which keeps huge photos cheap.
                scale = max_side / max(width, height)
                image.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageError(
                f"{name} claims more than {MAX_PIXELS:,} pixels, the most accepted; it was not "
                f"decoded ({error})."
            ) from error
        except UnidentifiedImageError as error:
            raise ImageError(f"{name} is not an image ovseg can read ({error}).") from error
        except (OSError, UserWarning) as error:
            raise ImageError(
                f"{name} could not be decoded; it may be truncated or corrupt ({error})."
            ) from error
        finally:
            Image.MAX_IMAGE_PIXELS = previous_limit
    return image


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"Expected an H×W, H×W×3 or H×W×4 array; got shape {array.shape}.")
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("The image array contains NaN or infinite values.")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise ImageError(
            f"Unsupported image array dtype {array.dtype}; use uint8, uint16 or float."
        )
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.int64)
        peak = 65535 if image.mode.startswith("I;16") or array.max() > 255 else 255
        image = Image.fromarray((np.clip(array, 0, peak) * 255 // peak).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        peak = 1.0 if array.max() <= 1.0 else 255.0
        image = Image.fromarray((np.clip(array / peak, 0, 1) * 255 + 0.5).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def crop_class_region(
    image: Tensor, mask: Tensor, *, size: int, fill: Tensor, mode: str = "masked"
) -> Tensor:
    """The region of ``mask`` in ``image`` as a square picture (DPSeg's Inference II prompts).

    The tight box around all of ``mask`` is cut out; in ``"masked"`` mode pixels outside the mask
    become ``fill``, in ``"bbox"`` mode the context inside the box is kept; the box is padded to a
    square with ``fill`` (centred) and resized to ``size``.

    Arguments:
        image: ``3×H×W`` in [0, 1].
        mask: ``H×W`` bool.
        size: side of the output.
        fill: ``3`` colour (DPSeg: the CLIP mean, zero after normalisation).
        mode: "masked" or "bbox".

    Returns:
        ``3×size×size``.
    """
    if mode not in ("masked", "bbox"):
        raise ValueError(f"crop_mode must be one of ['masked', 'bbox']; got {mode!r}.")
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("The class mask is empty; there is nothing to crop.")
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    fill = fill.to(image.dtype).view(3, 1, 1)
    crop = image[:, top:bottom, left:right]
    if mode == "masked":
        crop = torch.where(mask[top:bottom, left:right], crop, fill)
    height, width = crop.shape[-2:]
    side = max(height, width)
    canvas = fill.expand(3, side, side).clone()
    offset_y, offset_x = (side - height) // 2, (side - width) // 2
    canvas[:, offset_y : offset_y + height, offset_x : offset_x + width] = crop
    if side == size:
        return canvas
    return F.interpolate(
        canvas[None], size=(size, size), mode="bilinear", antialias=side > size, align_corners=False
    )[0]
