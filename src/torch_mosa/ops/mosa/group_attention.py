"""Causal attention inside each (b, e) group of selected slots, for selections too wide for the MoSA row kernels.

The row kernels hold a whole group of k slots in one tile and form its [k, k] scores in registers, which works up
to k = 128 (64 in float32). Wider selections (sparsity 4 at T = 1024 is k = 256) keep the split path's kernels
around this attention (triton_mosa.py, "wide"), which gets q, k, v [E, B, k, d] already rotated.
Both directions run inside the MoSA custom ops, where autograd records nothing, so the backward is called
explicitly: on a GPU in 16 bits without packed documents, the flash kernels SDPA itself dispatches to (forward with
its log-sum-exp, then their backward); otherwise the backward written out over chunks of heads, so its [k, k]
probabilities stay small (also the deterministic choice: flash's backward adds with atomics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# the written-out backward builds its [heads, B, k, k] probabilities for this many elements at most at once
BACKWARD_CHUNK_ELEMENTS = 1 << 26


@dataclass
class GroupAttention:
    """One forward's q, k, v [E, B, k, d] (rotated), its mask, its output o [E, B, k, d] (contiguous) and, on the
    flash route, what the flash backward needs."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    allowed: torch.Tensor | None  # [E, B, k, k] with packed documents, else None (causal)
    o: torch.Tensor
    flash: tuple | None = None  # the flash forward's outputs


def _flash_usable(q: torch.Tensor, allowed) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and allowed is None and q.shape[-1] <= 256


def group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None = None,
                    for_backward: bool = False) -> GroupAttention:
    """Softmax attention of every slot over the slots at or before it in its group (allowed: of its own document
    too). q, k, v [E, B, k, d]. for_backward: on the flash route, also keep the log-sum-exp and the rest its backward
    needs."""
    flash = None
    if for_backward and _flash_usable(q, allowed):
        flash = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)
        o = flash[0]
    elif allowed is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return GroupAttention(q, k, v, allowed, o.contiguous(), flash)


def group_attention_backward(forward: GroupAttention, do: torch.Tensor, deterministic: bool = False):
    """(dq, dk, dv) [E, B, k, d] of `group_attention` (called with for_backward=True) given dO [E, B, k, d].
    deterministic: never the flash backward (its dQ is summed with atomics)."""
    if forward.flash is not None and not deterministic:
        out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, _ = forward.flash
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, forward.q, forward.k, forward.v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, rng_state, unused)
    return _written_out_backward(forward.q, forward.k, forward.v, do, forward.allowed)


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
