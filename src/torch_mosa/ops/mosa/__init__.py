"""MoSA head op: `mosa_attention` dispatches to the reference or the fast kernels (see ops/dispatch.py)."""

from __future__ import annotations

import torch

from torch_mosa.ops.dispatch import use_fast_path
from torch_mosa.ops.mosa.reference import mosa_attention_reference


def mosa_attention(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    w_o: torch.Tensor,
    indices: torch.Tensor,
    scores: torch.Tensor,
    *,
    rotary_dim: int,
    rope_base: float,
) -> torch.Tensor:
    """Sum over heads of MoSA head outputs, scattered back to [B, T, h].

    x [B, T, h]; w_qkv [E, h, 3*d]; w_o [E, d, h]; indices [B, E, k] positions in slot order (slot i attends to
    slots <= i); scores [B, E, k] router scores of the selected tokens (0 for unused slots, which go last).
    """
    if use_fast_path(x):
        from torch_mosa.ops.mosa.triton_mosa import mosa_attention_triton

        return mosa_attention_triton(x, w_qkv, w_o, indices, scores, rotary_dim=rotary_dim, rope_base=rope_base)
    return mosa_attention_reference(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base)
