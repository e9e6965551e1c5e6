"""Decode step of sparse heads (MoSA and fixed) over a per-head KV cache: `sparse_decode` dispatches to the
reference or the fused kernels (see ops/dispatch.py)."""

from __future__ import annotations

import torch

from torch_mosa.ops.decode.reference import sparse_decode_reference
from torch_mosa.ops.dispatch import use_fast_path


def sparse_decode(x: torch.Tensor, heads: torch.Tensor | None, joined: torch.Tensor, scores: torch.Tensor,
                  position: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor, cache_k: torch.Tensor,
                  cache_v: torch.Tensor, counts: torch.Tensor, capacity_overflow: torch.Tensor, *, rotary_dim: int,
                  rope_base: float) -> torch.Tensor:
    """One new token per row through the sparse heads it joined -> out [B, h] (the heads' summed output).

    x [B, h] the token's input; heads [B, J] the head of each of J slots (None: all E heads in order); joined
    [B, J] bool, the token joins that head; scores [B, J] its router scores (1 for fixed heads); position [1] long,
    the token's position (a tensor: no host sync, CUDA-graph safe); w_qkv [E, h, 3d], w_o [E, d, h] in x's dtype.
    The cache, updated in place: cache_k, cache_v [B, E, capacity + 1, d], counts [B, E] tokens each head holds,
    capacity_overflow a 0-dim long counter. A joined head with room appends its K, V (rotated at `position`) and
    the token attends over the head's held tokens; a join into a full head is counted in capacity_overflow and
    adds nothing. The last cache slot is scratch (never attended).
    """
    if use_fast_path(x):
        from torch_mosa.ops.decode.triton_decode import sparse_decode_triton

        return sparse_decode_triton(x.contiguous(), None if heads is None else heads.contiguous(),
                                    joined.contiguous(), scores.contiguous(), position, w_qkv.contiguous(),
                                    w_o.contiguous(), cache_k, cache_v, counts, capacity_overflow, int(rotary_dim),
                                    float(rope_base))
    return sparse_decode_reference(x, heads, joined, scores, position, w_qkv, w_o, cache_k, cache_v, counts,
                                   capacity_overflow, rotary_dim, rope_base)
