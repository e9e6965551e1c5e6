"""Causal attention inside each (b, e) group of selected slots, on the split path's Q|K|V buffer.

The MoSA row kernels hold a whole group of k slots in one tile and form its [k, k] scores in registers, which works
up to k = 128 (64 in float32). Wider selections (sparsity 4 at T = 1024 is k = 256) keep the split path's GEMM
kernels (the projection with the gather in its prologue, the scattered output projection, the dX rows, the weight
gradients) and run only this attention in PyTorch between them: RoPE at each slot's position, then attention.
Both directions run inside the MoSA custom ops, where autograd records nothing, so the backward is called
explicitly: on a GPU in 16 bits without packed documents, the flash kernels SDPA itself dispatches to (forward with
its log-sum-exp, then their backward); otherwise the backward written out over chunks of heads, so its [k, k]
probabilities stay small (also the deterministic choice: flash's backward adds with atomics).
Rows are head-major as the kernels store them: qkv [E, B*k, 3d], un-rotated; O and dO [E, B*k, d].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torch_mosa.ops.rope import apply_rope

# the written-out backward builds its [heads, B, k, k] probabilities for this many elements at most at once
BACKWARD_CHUNK_ELEMENTS = 1 << 26


@dataclass
class GroupAttention:
    """One forward's rotated q, k, v [E, B, k, d], what the backward needs besides, and its output o [E, B*k, d]."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    rope_positions: torch.Tensor  # [E, B, k]
    allowed: torch.Tensor | None  # [E, B, k, k] with packed documents, else None (causal)
    o: torch.Tensor
    flash: tuple | None = None  # the flash forward's outputs, for its backward


def _per_slot(per_token: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[B, T] values -> [E, B, k] the values at each slot's position."""
    batch, num_heads, k = indices.shape
    return per_token.gather(1, indices.reshape(batch, num_heads * k)).view(batch, num_heads, k).transpose(0, 1)


def _rope(x: torch.Tensor, positions, rotary_dim: int, rope_base: float) -> torch.Tensor:
    """RoPE in at least float32 (as the kernels rotate 16-bit rows), returned in x's dtype."""
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return apply_rope(x.to(wide), positions, rotary_dim, rope_base).to(x.dtype)


def _flash_usable(q: torch.Tensor, allowed) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and allowed is None and q.shape[-1] <= 256


def group_attention(qkv: torch.Tensor, indices: torch.Tensor, rotary_dim: int, rope_base: float,
                    positions=None, document_ids=None, for_backward: bool = False) -> GroupAttention:
    """Every slot attends to the slots at or before it in its (b, e) group (of its own document with packed
    documents). qkv [E, B*k, 3d] un-rotated; indices [B, E, k]. for_backward: on the flash route, also keep the
    log-sum-exp and the rest its backward needs."""
    batch, num_heads, k = indices.shape
    qkv = qkv.view(num_heads, batch, k, -1)
    rope_positions = indices.transpose(0, 1) if positions is None else _per_slot(positions, indices)
    allowed = None
    if document_ids is not None:
        slot_document = _per_slot(document_ids, indices)
        causal = torch.ones(k, k, dtype=torch.bool, device=indices.device).tril()
        allowed = causal & (slot_document[..., :, None] == slot_document[..., None, :])
    q, key, v = qkv.chunk(3, dim=-1)
    q, key = _rope(q, rope_positions, rotary_dim, rope_base), _rope(key, rope_positions, rotary_dim, rope_base)
    flash = None
    if for_backward and _flash_usable(q, allowed):
        flash = torch.ops.aten._scaled_dot_product_flash_attention(q, key, v, 0.0, True, False)
        o = flash[0]
    elif allowed is None:
        o = F.scaled_dot_product_attention(q, key, v, is_causal=True)
    else:
        o = F.scaled_dot_product_attention(q, key, v, attn_mask=allowed)
    return GroupAttention(q, key, v, rope_positions, allowed, o.reshape(num_heads, batch * k, -1).contiguous(), flash)


def group_attention_backward(forward: GroupAttention, do: torch.Tensor, rotary_dim: int, rope_base: float,
                             deterministic: bool = False) -> torch.Tensor:
    """dQ|dK|dV [E, B*k, 3d] in the forward's dtype, with respect to the un-rotated qkv, of `group_attention`
    (called with for_backward=True) given dO [E, B*k, d]. deterministic: never the flash backward (its dQ is summed
    with atomics)."""
    q, key, v = forward.q, forward.k, forward.v
    num_heads, batch, k, head_dim = q.shape
    do = do.view(num_heads, batch, k, head_dim)
    if forward.flash is not None and not deterministic:
        out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, _ = forward.flash
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, key, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, rng_state, unused)
    else:
        dq, dk, dv = _written_out_backward(q, key, v, do, forward.allowed)
    # un-rotate: RoPE is a rotation by the position's angle, so its transpose rotates by minus that angle
    back = -forward.rope_positions
    dqkv = torch.cat([_rope(dq, back, rotary_dim, rope_base), _rope(dk, back, rotary_dim, rope_base), dv], dim=-1)
    return dqkv.view(num_heads, batch * k, 3 * head_dim)


def _written_out_backward(q, key, v, do, allowed):
    """(dq, dk, dv) of causal softmax attention (allowed [E, B, k, k], or None for causal), the probabilities
    recomputed per chunk of heads with the softmax in float32 for 16-bit inputs."""
    num_heads, batch, k, head_dim = q.shape
    dtype = q.dtype
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if allowed is None:
        allowed = torch.ones(k, k, dtype=torch.bool, device=q.device).tril()
    scale = head_dim ** -0.5
    dq, dk, dv = torch.empty_like(q), torch.empty_like(key), torch.empty_like(v)
    chunk = max(1, BACKWARD_CHUNK_ELEMENTS // (batch * k * k))
    for e0 in range(0, num_heads, chunk):
        heads = slice(e0, e0 + chunk)
        chunk_allowed = allowed if allowed.dim() == 2 else allowed[heads]
        scores = torch.matmul(q[heads], key[heads].transpose(-1, -2)).to(wide) * scale
        p = torch.softmax(scores.masked_fill(~chunk_allowed, float("-inf")), dim=-1)
        dp = torch.matmul(do[heads], v[heads].transpose(-1, -2)).to(wide)
        ds = (p * (dp - (p * dp).sum(-1, keepdim=True)) * scale).to(dtype)
        dq[heads] = torch.matmul(ds, key[heads])
        dk[heads] = torch.matmul(ds.transpose(-1, -2), q[heads])
        dv[heads] = torch.matmul(p.to(dtype).transpose(-1, -2), do[heads])
    return dq, dk, dv
