"""Rotary position embedding on the first `rotary_dim` dims of each head (GPT-NeoX "rotate half" layout).

MoSA rotates a selected token by its ORIGINAL position in the sequence, so every function here takes explicit
`positions` instead of assuming 0..T-1.
"""

from __future__ import annotations

import torch


def rotary_dim_for(head_dim: int, rotate_fraction: float) -> int:
    """Number of rotated dims: `rotate_fraction * head_dim`, rounded down to an even number."""
    if not 0.0 <= rotate_fraction <= 1.0:
        raise ValueError(f"rotate_fraction must be in [0, 1], got {rotate_fraction}")
    rotary_dim = int(rotate_fraction * head_dim)
    return rotary_dim - rotary_dim % 2


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, base: float, dtype: torch.dtype):
    """cos, sin of shape positions.shape + [rotary_dim], computed in float32 (float64 for float64 inputs)."""
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    half = rotary_dim // 2
    inv_freq = base ** (-torch.arange(0, half, device=positions.device, dtype=compute_dtype) * 2.0 / rotary_dim)
    angles = positions.to(compute_dtype).unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_table(max_len: int, rotary_dim: int, base: float, dtype: torch.dtype, device):
    """(cos, sin), each [max_len, rotary_dim], of positions 0..max_len-1 in the dtype rope_cos_sin computes in for
    `dtype` (float64 for float64, else float32): for apply_rope(table=...) to look rows up instead of computing them.

    Decoding wants the lookup: under torch.compile the computed cos and sin of a decode step became three extra
    kernels per layer, 11% of the Tiny dense model's step at B=1 on an H100
    (benchmarks/results/profile-decode-compiled-h100-2026-11-23.txt)."""
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return rope_cos_sin(torch.arange(max_len, device=device), rotary_dim, base, compute_dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float, table=None) -> torch.Tensor:
    """Rotate the first `rotary_dim` dims of x [..., n, head_dim] by positions [..., n] (broadcastable).

    `table`: rope_table's (cos, sin) for these rotary_dim and base, covering every position; its rows are read
    instead of computed, with the same values (the same float32 or float64 computation, cast to x's dtype)."""
    if rotary_dim == 0:
        return x
    if table is not None and (table[0].dtype == torch.float64) == (x.dtype == torch.float64):
        cos, sin = table[0][positions].to(x.dtype), table[1][positions].to(x.dtype)
    else:
        cos, sin = rope_cos_sin(positions, rotary_dim, base, x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1)
