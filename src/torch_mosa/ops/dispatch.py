"""The one place that picks between the plain-PyTorch reference and the fast GPU kernels.

CUDA tensors take the fast path when Triton is importable; everything else takes the reference.
Switch the fast path off with the environment variable TORCH_MOSA_FAST_PATH=0 or `set_fast_path(False)`.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager

import torch

_fast_path_enabled = os.environ.get("TORCH_MOSA_FAST_PATH", "1").strip().lower() not in ("0", "false", "off", "no")


def set_fast_path(enabled: bool) -> None:
    global _fast_path_enabled
    _fast_path_enabled = bool(enabled)


def fast_path_enabled() -> bool:
    return _fast_path_enabled


@contextmanager
def fast_path(enabled: bool):
    """Context manager: `with fast_path(False): ...` forces the reference path inside the block."""
    previous = _fast_path_enabled
    set_fast_path(enabled)
    try:
        yield
    finally:
        set_fast_path(previous)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_fast_path(x: torch.Tensor) -> bool:
    return _fast_path_enabled and x.is_cuda and triton_available()
