"""One decode step of sparse heads (MoSA and fixed) over a per-head KV cache: `route_heads` (a new token's causal
routing to at most J heads) and `sparse_decode` (the step over the joined heads) each dispatch to the reference or
the fused kernels (see ops/dispatch.py)."""

from __future__ import annotations

import torch

from torch_mosa.ops.decode.reference import largest_margin_heads, route_heads_reference, sparse_decode_reference
from torch_mosa.ops.dispatch import use_fast_path

__all__ = ["largest_margin_heads", "route_heads", "sparse_decode"]


def route_heads(logits: torch.Tensor, thresholds: torch.Tensor, token_overflow: torch.Tensor, heads_per_token: int):
    """A new token's causal routing (SPEC §5) to at most J = heads_per_token heads.

    logits [B, E] the token's router logits, thresholds [E]; token_overflow a 0-dim long counter, incremented in
    place by the joins beyond J. Returns heads [B, J] long (the J heads of largest margin logit - threshold, in the
    order of `largest_margin_heads`), joined [B, J] bool (that head's logit passes its threshold) and scores [B, J]
    (sigmoid of the logit, in the logits' dtype). On CUDA one kernel instead of a sort, gathers and a reduction.
    """
    if not 0 < heads_per_token <= logits.shape[-1]:
        raise ValueError(f"heads_per_token must be in 1..{logits.shape[-1]} (the number of heads), "
                         f"got {heads_per_token}")
    if use_fast_path(logits):
        from torch_mosa.ops.decode.triton_decode import route_heads_triton

        return route_heads_triton(logits.contiguous(), thresholds.contiguous(), token_overflow, int(heads_per_token))
    return route_heads_reference(logits, thresholds, token_overflow, heads_per_token)


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
