"""Where a run computes, and the mixed precision it gets there.

``"auto"`` picks CUDA when there is a GPU and the CPU otherwise. Mixed precision follows the
device: bf16 autocast on CUDA (an H200 runs it natively), float32 on the CPU (this project's CPUs
have no native bf16, so autocast there would be slower, not faster). A method that needs float32
somewhere under autocast (DCP-CLIP's category selection) disables it locally.
"""

from __future__ import annotations

import contextlib

import torch

from ovseg.errors import OptionError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "off", "bf16", "fp16")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The device ``name`` means here: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:1"``.

    Raises:
        OptionError: an unknown name, or CUDA asked for on a machine without it.
    """
    if isinstance(name, torch.device):
        name = str(name)
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise OptionError(f"device must be one of {list(DEVICES)} (or cuda:N); got {name!r}.")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {name!r} was asked for, but this machine has no CUDA GPU.")
    return torch.device(name)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device``: ``"auto"`` is bf16 on CUDA and off
    elsewhere; ``"off"`` is float32; ``"bf16"`` and ``"fp16"`` force that autocast dtype."""
    if precision not in PRECISIONS:
        raise OptionError(f"precision must be one of {list(PRECISIONS)}; got {precision!r}.")
    if precision == "off" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGEST_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the system (Linux only).

    By default glibc maps every allocation above 32 MB afresh and unmaps it when freed, so each
    full-resolution ``B×K×256×256`` temporary of a training step pays its page faults again: on
    this project's 2-core VM ``abs`` of 8.4 M floats took 15 ms that way and 1.8 ms from reused
    memory, and a DPSeg training step went from 3.3 to 2.5 s, the same bits either way. The cost
    is that a process keeps its peak memory until it exits, which suits a training run (the
    training scripts call this) better than a long-lived server.

    Returns:
        Whether the allocator took the settings (False off glibc).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_THRESHOLD)
            and libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False
