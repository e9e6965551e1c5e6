"""Causal attention inside each (b, e) group of selected slots, on the split path's Q|K|V buffer.

The MoSA row kernels hold a whole group of k slots in one tile and form its [k, k] scores in registers, which works
up to k = 128 (64 in float32). Wider selections (sparsity 4 at T = 1024 is k = 256) keep the split path's GEMM
kernels (the projection with the gather in its prologue, the scattered output projection, the dX rows, the weight
gradients) and run only this attention in PyTorch between them: RoPE at each slot's position, then
scaled_dot_product_attention (a flash kernel on a GPU) forward, and its backward written out (the backward runs
inside a custom op, where autograd records nothing), over chunks of heads so the [k, k] probabilities stay small.
Rows are head-major as the kernels store them: qkv [E, B*k, 3d], un-rotated; O and dO [E, B*k, d].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_mosa.ops.rope import apply_rope

# the backward's [heads, B, k, k] float32 probabilities are built for this many elements at most at once
BACKWARD_CHUNK_ELEMENTS = 1 << 26


def _per_slot(per_token: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[B, T] values -> [E, B, k] the values at each slot's position."""
    batch, num_heads, k = indices.shape
    return per_token.gather(1, indices.reshape(batch, num_heads * k)).view(batch, num_heads, k).transpose(0, 1)


def _slot_layout(indices, positions, document_ids):
    """(RoPE positions [E, B, k], allowed [E, B, k, k] bool or None): the positions each slot is rotated by, and
    with packed documents which earlier slots of the group each slot may attend to (same document)."""
    rope_positions = indices.transpose(0, 1) if positions is None else _per_slot(positions, indices)
    if document_ids is None:
        return rope_positions, None
    k = indices.shape[-1]
    slot_document = _per_slot(document_ids, indices)
    causal = torch.ones(k, k, dtype=torch.bool, device=indices.device).tril()
    return rope_positions, causal & (slot_document[..., :, None] == slot_document[..., None, :])


def _rope(x: torch.Tensor, positions, rotary_dim: int, rope_base: float) -> torch.Tensor:
    """RoPE in at least float32 (as the kernels rotate 16-bit rows), returned in x's dtype."""
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return apply_rope(x.to(wide), positions, rotary_dim, rope_base).to(x.dtype)


def _rotated(qkv: torch.Tensor, rope_positions, rotary_dim: int, rope_base: float):
    """qkv [E, B, k, 3d] -> rotated q, k and v [E, B, k, d] in qkv's dtype."""
    q, key, v = qkv.chunk(3, dim=-1)
    return _rope(q, rope_positions, rotary_dim, rope_base), _rope(key, rope_positions, rotary_dim, rope_base), v


def group_attention(qkv: torch.Tensor, indices: torch.Tensor, rotary_dim: int, rope_base: float,
                    positions=None, document_ids=None) -> torch.Tensor:
    """O [E, B*k, d] in qkv's dtype: every slot attends to the slots at or before it in its (b, e) group (of its
    own document with packed documents). qkv [E, B*k, 3d] un-rotated; indices [B, E, k]."""
    batch, num_heads, k = indices.shape
    qkv = qkv.view(num_heads, batch, k, -1)
    rope_positions, allowed = _slot_layout(indices, positions, document_ids)
    q, key, v = _rotated(qkv, rope_positions, rotary_dim, rope_base)
    if allowed is None:
        o = F.scaled_dot_product_attention(q, key, v, is_causal=True)
    else:
        o = F.scaled_dot_product_attention(q, key, v, attn_mask=allowed)
    return o.reshape(num_heads, batch * k, -1)


def group_attention_backward(qkv: torch.Tensor, do: torch.Tensor, indices: torch.Tensor, rotary_dim: int,
                             rope_base: float, positions=None, document_ids=None) -> torch.Tensor:
    """dQ|dK|dV [E, B*k, 3d] in qkv's dtype, with respect to the un-rotated qkv, of `group_attention` given
    dO [E, B*k, d]. The probabilities are recomputed per chunk of heads (softmax in float32 for 16-bit inputs)."""
    batch, num_heads, k = indices.shape
    head_dim = qkv.shape[-1] // 3
    dtype = qkv.dtype
    qkv = qkv.view(num_heads, batch, k, 3 * head_dim)
    do = do.view(num_heads, batch, k, head_dim)
    rope_positions, allowed = _slot_layout(indices, positions, document_ids)
    if allowed is None:
        allowed = torch.ones(k, k, dtype=torch.bool, device=qkv.device).tril()
    scale = head_dim ** -0.5
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # the softmax's dtype
    dqkv = torch.empty_like(qkv)
    chunk = max(1, BACKWARD_CHUNK_ELEMENTS // (batch * k * k))
    for e0 in range(0, num_heads, chunk):
        heads = slice(e0, e0 + chunk)
        chunk_allowed = allowed if allowed.dim() == 2 else allowed[heads]
        q, key, v = _rotated(qkv[heads], rope_positions[heads], rotary_dim, rope_base)
        d_out = do[heads]
        scores = torch.matmul(q, key.transpose(-1, -2)).to(wide) * scale
        p = torch.softmax(scores.masked_fill(~chunk_allowed, float("-inf")), dim=-1)
        dp = torch.matmul(d_out, v.transpose(-1, -2)).to(wide)
        ds = (p * (dp - (p * dp).sum(-1, keepdim=True)) * scale).to(dtype)
        dq = torch.matmul(ds, key)
        dk = torch.matmul(ds.transpose(-1, -2), q)
        dv = torch.matmul(p.to(dtype).transpose(-1, -2), d_out)
        # un-rotate: RoPE is a rotation by the position's angle, so its transpose rotates by minus that angle
        back = -rope_positions[heads]
        dqkv[heads, ..., :head_dim] = _rope(dq, back, rotary_dim, rope_base)
        dqkv[heads, ..., head_dim:2 * head_dim] = _rope(dk, back, rotary_dim, rope_base)
        dqkv[heads, ..., 2 * head_dim:] = dv
    return dqkv.view(num_heads, batch * k, 3 * head_dim)
