"""Plain-PyTorch MoSA head computation: the CPU path and the oracle every kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_mosa.ops.rope import apply_rope


def mosa_attention_reference(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    w_o: torch.Tensor,
    indices: torch.Tensor,
    scores: torch.Tensor,
    rotary_dim: int,
    rope_base: float,
    router_weight: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather, project, attend causally over slots, scale, project back and scatter-add.

    x [B, T, h]; w_qkv [E, h, 3*d]; w_o [E, d, h]; indices [B, E, k] int64 token positions in slot order;
    scores [B, E, k]; router_weight [E, h] or None. Slot i attends to slots 0..i, so callers pass each head's
    selection sorted by position (invalid slots, with score 0, go last). Returns y [B, T, h] = sum over heads of the
    scattered outputs, in x.dtype; 16-bit inputs are computed in float32 (as the kernels accumulate).

    With router_weight, scores are taken as sigmoid(x[position] . router_weight[e]) (0 on padding slots): their
    values are used as given, and the gradient reaches router_weight and x through the recomputed logits instead
    of through scores. Without it, scores are an ordinary differentiable input.

    Packed documents: positions [B, T] gives the position RoPE rotates each token by (default: its index), and
    document_ids [B, T] keeps documents apart: a slot attends only to earlier slots of its own document.
    """
    # autocast would run the einsums below in 16 bits and leave the head outputs in a dtype the float32 sum cannot
    # take; the op computes in its inputs' dtype (float32 for 16-bit inputs) with or without autocast, as the
    # kernels do
    with torch.autocast(x.device.type, enabled=False):
        return _mosa_attention_composition(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base, router_weight,
                                           positions, document_ids, upcast=True)


def mosa_attention_composed(x, w_qkv, w_o, indices, scores, rotary_dim: int, rope_base: float, router_weight=None,
                            positions=None, document_ids=None) -> torch.Tensor:
    """The reference's composition computed in the inputs' dtype: for 16-bit inputs the projections are 16-bit
    GEMMs (fp32 accumulation) and the attention is 16-bit SDPA (a flash kernel on a GPU), and only the sum over
    heads is kept in fp32, where the reference computes everything in float32. Selections wider than the row
    kernels' tiles took this route until session 13; it stays as the yardstick of the wide path that replaced it
    (benchmarks/experiments/large_k_composition.py). Same contract as mosa_attention_reference; equal to it for
    float32 and float64 inputs."""
    with torch.autocast(x.device.type, enabled=False):
        return _mosa_attention_composition(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base, router_weight,
                                           positions, document_ids, upcast=False)


def _mosa_attention_composition(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base, router_weight, positions,
                                document_ids, upcast: bool):
    """upcast: 16-bit inputs are computed in float32 (the oracle); else in their own dtype. Wider weights are
    rounded to x's dtype first, as the kernels read them."""
    w_qkv, w_o = w_qkv.to(x.dtype), w_o.to(x.dtype)
    router_weight = router_weight.to(x.dtype) if router_weight is not None else None
    out_dtype = x.dtype
    sum_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    if upcast and x.dtype in (torch.float16, torch.bfloat16):
        x, w_qkv, w_o = x.float(), w_qkv.float(), w_o.float()
        router_weight = router_weight.float() if router_weight is not None else None
    batch, seq_len, hidden = x.shape
    num_heads, _, three_d = w_qkv.shape
    head_dim = three_d // 3
    k = indices.shape[-1]
    flat_index = indices.reshape(batch, num_heads * k, 1).expand(-1, -1, hidden)
    x_selected = x.gather(1, flat_index).view(batch, num_heads, k, hidden)
    scores = scores.to(x.dtype)
    if router_weight is not None:
        router_scores = torch.sigmoid(torch.einsum("bekh,eh->bek", x_selected, router_weight)) * (scores != 0)
        scores = scores.detach() + (router_scores - router_scores.detach())
    q, key, v = torch.einsum("bekh,ehd->bekd", x_selected, w_qkv).split(head_dim, dim=-1)
    rope_positions = indices if positions is None else per_slot_values(positions, indices)
    q = apply_rope(q, rope_positions, rotary_dim, rope_base)
    key = apply_rope(key, rope_positions, rotary_dim, rope_base)
    if document_ids is None:
        attended = F.scaled_dot_product_attention(q, key, v, is_causal=True)
    else:
        allowed = document_mask(per_slot_values(document_ids, indices))
        attended = F.scaled_dot_product_attention(q, key, v, attn_mask=allowed)
    head_out = torch.einsum("bekd,edh->bekh", attended * scores.unsqueeze(-1), w_o)
    y = x.new_zeros(batch, seq_len, hidden, dtype=sum_dtype)
    return y.scatter_add_(1, flat_index, head_out.reshape(batch, num_heads * k, hidden).to(sum_dtype)).to(out_dtype)


def per_slot_values(per_token: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[B, T] values -> [B, E, k] the values at each slot's position."""
    batch, num_heads, k = indices.shape
    return per_token.gather(1, indices.reshape(batch, num_heads * k)).view(batch, num_heads, k)


def document_mask(slot_documents: torch.Tensor) -> torch.Tensor:
    """[..., k] document id of every slot -> [..., k, k]: slot i may attend to slot j <= i of its own document."""
    k = slot_documents.shape[-1]
    causal = torch.ones(k, k, dtype=torch.bool, device=slot_documents.device).tril()
    return causal & (slot_documents[..., :, None] == slot_documents[..., None, :])


def weight_dtypes_for(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The weight dtypes the op takes with inputs x of `dtype`: x's own, and float32 for 16-bit x (float32
    parameters with autocast's 16-bit activations). Wider weights are rounded to x's dtype inside the op, which
    returns their gradients in float32."""
    return (dtype, torch.float32) if dtype in (torch.float16, torch.bfloat16) else (dtype,)


def check_mosa_inputs(x, w_qkv, w_o, indices, scores, rotary_dim: int, router_weight=None, positions=None,
                      document_ids=None) -> None:
    """Shapes and dtypes of the MoSA op's arguments; raises ValueError naming the bad one."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, h], got shape {tuple(x.shape)}")
    batch, _, hidden = x.shape
    if w_qkv.dim() != 3 or w_qkv.shape[1] != hidden or w_qkv.shape[2] % 3:
        raise ValueError(f"w_qkv must be [E, h={hidden}, 3*d], got shape {tuple(w_qkv.shape)}")
    num_heads, head_dim = w_qkv.shape[0], w_qkv.shape[2] // 3
    if tuple(w_o.shape) != (num_heads, head_dim, hidden):
        raise ValueError(f"w_o must be [E={num_heads}, d={head_dim}, h={hidden}], got shape {tuple(w_o.shape)}")
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (batch, num_heads):
        raise ValueError(f"indices must be [B={batch}, E={num_heads}, k], got shape {tuple(indices.shape)}")
    if tuple(scores.shape) != tuple(indices.shape):
        raise ValueError(f"scores must match indices {tuple(indices.shape)}, got shape {tuple(scores.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    weight_dtypes = weight_dtypes_for(x.dtype)
    if w_qkv.dtype not in weight_dtypes or w_o.dtype not in weight_dtypes:
        raise ValueError(f"w_qkv ({w_qkv.dtype}) and w_o ({w_o.dtype}) must be of x's dtype {x.dtype}"
                         + (" or float32 (parameters under autocast)" if len(weight_dtypes) > 1 else ""))
    if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim must be even and in [0, head_dim={head_dim}], got {rotary_dim}")
    if router_weight is not None:
        if tuple(router_weight.shape) != (num_heads, hidden) or router_weight.dtype not in weight_dtypes:
            raise ValueError(f"router_weight must be [E={num_heads}, h={hidden}] of dtype "
                             f"{' or '.join(map(str, weight_dtypes))}, got {tuple(router_weight.shape)} "
                             f"{router_weight.dtype}")
        if scores.requires_grad:
            raise ValueError("with router_weight, scores are sigmoid(x . router_weight) and take no gradient of "
                             "their own: pass them detached")
    for name, per_token in (("positions", positions), ("document_ids", document_ids)):
        if per_token is not None and (tuple(per_token.shape) != tuple(x.shape[:2]) or per_token.dtype.is_floating_point
                                      or per_token.dtype == torch.bool):
            raise ValueError(f"{name} must be an integer [B, T] = {tuple(x.shape[:2])} tensor, got "
                             f"{tuple(per_token.shape)} {per_token.dtype}")
