"""The one place that picks between the plain-PyTorch reference and the fast GPU kernels.

CUDA tensors of float32, bfloat16 or float16 take the fast path when Triton is importable; everything else (CPU,
float64 anywhere) takes the reference. Switch the fast path off with the environment variable
TORCH_MOSA_FAST_PATH=0, for the current thread or task with `with fast_path(False): ...`, or process-wide with
`set_fast_path(False)`. The switch lives in a ContextVar, so one thread's `fast_path(False)` block does not change
what another thread runs.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from contextvars import ContextVar

import torch

FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_default_enabled = os.environ.get("TORCH_MOSA_FAST_PATH", "1").strip().lower() not in ("0", "false", "off", "no")
_fast_path_enabled: ContextVar[bool | None] = ContextVar("torch_mosa_fast_path", default=None)


def set_fast_path(enabled: bool) -> None:
    """Process-wide default for threads and tasks that have not chosen with `fast_path`."""
    global _default_enabled
    _default_enabled = bool(enabled)


@torch.compiler.assume_constant_result
def fast_path_enabled() -> bool:
    """Whether the fast path is on here. torch.compile reads it once while tracing (it cannot trace a ContextVar)
    and bakes the answer into the compiled graph: switch it before compiling, not after."""
    chosen = _fast_path_enabled.get()
    return _default_enabled if chosen is None else chosen


@contextmanager
def fast_path(enabled: bool):
    """Context manager: `with fast_path(False): ...` forces the reference path inside the block (this thread only)."""
    token = _fast_path_enabled.set(bool(enabled))
    try:
        yield
    finally:
        _fast_path_enabled.reset(token)


# Looked up once: torch.compile cannot trace importlib (a lookup per call would break the graph).
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def use_fast_path(x: torch.Tensor) -> bool:
    return fast_path_enabled() and x.is_cuda and x.dtype in FAST_DTYPES and triton_available()
