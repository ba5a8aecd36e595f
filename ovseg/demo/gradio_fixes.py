"""A fix for a race in Gradio's image cache that many visitors at once run into.

Gradio writes every image an event returns (gallery items, image outputs) to
``<cache>/<hash of the bytes>/image.webp`` with ``Path.write_bytes``, which truncates the file and
writes it again even when it already holds exactly those bytes. When two answers contain the same
image (one visitor asking twice, or two visitors with the same picture), the second write can
truncate the file while the first answer is still being downloaded: the server fails with
``h11 LocalProtocolError: Too little data for declared Content-Length`` and the browser gets a
broken image. ovseg's load test (``benchmarks/load_test.py``) hit it with 4 sessions.

:func:`install` replaces ``gradio.processing_utils.save_pil_to_cache`` (which every image
component calls through the module, so the replacement reaches them all) with a version that
keeps an existing file, since the name is the hash of its content, and writes a new one under a
temporary name before renaming it into place, as Gradio already does for files
(``save_file_to_cache``).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from PIL import Image

_INSTALLED = False


def save_pil_to_cache(
    img: Image.Image, cache_dir: str, name: str = "image", format: str = "webp"
) -> str:
    """Gradio's ``save_pil_to_cache`` (same arguments and result), safe under concurrency."""
    from gradio import processing_utils

    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    if path.exists():
        # Same name, same bytes. Touch it: Gradio's delete_cache ages files by their ctime.
        with contextlib.suppress(OSError):
            os.utime(path)
        return str(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return str(path)


def install() -> None:
    """Use :func:`save_pil_to_cache` inside Gradio (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from gradio import processing_utils

    processing_utils.save_pil_to_cache = save_pil_to_cache
    _INSTALLED = True
