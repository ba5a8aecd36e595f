"""Device and precision resolution for training and inference."""

import contextlib
import warnings

import pytest
import torch

from ovseg.devices import autocast, resolve_device
from ovseg.errors import OvsegError


def test_auto_is_cuda_when_there_is_a_gpu_and_the_cpu_otherwise():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_unknown_devices_and_a_missing_gpu_are_clear_errors():
    with pytest.raises(OvsegError, match="device must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(OvsegError, match="has no CUDA GPU"):
            resolve_device("cuda")


def test_mixed_precision_is_bf16_on_cuda_and_off_on_the_cpu():
    cpu = torch.device("cpu")
    assert isinstance(autocast("auto", cpu), contextlib.nullcontext)
    assert isinstance(autocast("off", cpu), contextlib.nullcontext)
    with autocast("bf16", cpu):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with warnings.catch_warnings():  # without a GPU, torch warns that CUDA autocast is off
        warnings.simplefilter("ignore", UserWarning)
        forced = autocast("auto", torch.device("cuda"))
    assert isinstance(forced, torch.autocast) and forced.fast_dtype == torch.bfloat16
    with pytest.raises(OvsegError, match="precision must be one of"):
        autocast("fp8", cpu)


def test_training_processes_keep_freed_memory_on_glibc(tmp_path):
    """The allocator setting the training scripts make; run in a child so pytest keeps its own."""
    import platform
    import subprocess
    import sys

    code = "from ovseg.devices import keep_freed_memory; print(keep_freed_memory())"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert result.stdout.strip() == str(expected)
