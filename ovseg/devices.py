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
