"""Plain-PyTorch MoSA head computation: the CPU path and the oracle every kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_mosa.layers.rope import apply_rope


def mosa_attention_reference(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    w_o: torch.Tensor,
    indices: torch.Tensor,
    scores: torch.Tensor,
    rotary_dim: int,
    rope_base: float,
) -> torch.Tensor:
    """Gather, project, attend causally over slots, scale, project back and scatter-add.

    x [B, T, h]; w_qkv [E, h, 3*d]; w_o [E, d, h]; indices [B, E, k] int64 token positions in slot order;
    scores [B, E, k]. Slot i attends to slots 0..i, so callers pass each head's selection sorted by position
    (invalid slots, with score 0, go last). Returns y [B, T, h] = sum over heads of the scattered outputs.
    """
    batch, seq_len, hidden = x.shape
    num_heads, _, three_d = w_qkv.shape
    head_dim = three_d // 3
    k = indices.shape[-1]
    flat_index = indices.reshape(batch, num_heads * k, 1).expand(-1, -1, hidden)
    x_selected = x.gather(1, flat_index).view(batch, num_heads, k, hidden)
    q, key, v = torch.einsum("bekh,ehd->bekd", x_selected, w_qkv).split(head_dim, dim=-1)
    q = apply_rope(q, indices, rotary_dim, rope_base)
    key = apply_rope(key, indices, rotary_dim, rope_base)
    attended = F.scaled_dot_product_attention(q, key, v, is_causal=True)
    head_out = torch.einsum("bekd,edh->bekh", attended * scores.unsqueeze(-1).to(attended.dtype), w_o)
    y = x.new_zeros(batch, seq_len, hidden)
    return y.scatter_add_(1, flat_index, head_out.reshape(batch, num_heads * k, hidden))
