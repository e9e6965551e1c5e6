"""Plain PyTorch for one decode step: the routing of a new token to at most J sparse heads, the step of sparse heads
over their per-head KV cache, and a whole layer's step of dense and MoSA heads. The CPU path and the kernels'
oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_mosa.ops.rope import apply_rope


def largest_margin_heads(router_logits: torch.Tensor, thresholds: torch.Tensor, heads_per_token: int):
    """router_logits [..., E], thresholds [E] -> (above [..., E] bool: the logit passes the threshold, heads
    [..., J]: the J = heads_per_token heads with the largest margin logit - threshold, in head order).

    Which J, exactly, so the fused kernel can match it: by margin (in torch's promoted dtype of logits and
    thresholds: bf16 margins of bf16 logits and thresholds tie more often than fp32 ones), equal margins by
    the lower head index, and when fewer than J heads pass, the others filled in by lowest index (a stable sort
    with -inf margins below the threshold)."""
    above = router_logits.detach() > thresholds
    margin = (router_logits.detach() - thresholds).masked_fill(~above, float("-inf"))
    top = torch.sort(margin, dim=-1, descending=True, stable=True).indices[..., :heads_per_token]
    return above, top.sort(dim=-1).values


def route_heads_reference(logits: torch.Tensor, thresholds: torch.Tensor, token_overflow: torch.Tensor,
                          heads_per_token: int):
    """A new token's causal routing to at most J heads; see `torch_mosa.ops.decode.route_heads`."""
    above, heads = largest_margin_heads(logits, thresholds, heads_per_token)
    joined = above.gather(-1, heads)
    token_overflow += above.sum() - joined.sum()
    return heads, joined, torch.sigmoid(logits).gather(-1, heads)


def sparse_decode_reference(x, heads, joined, scores, position, w_qkv, w_o, cache_k, cache_v, counts,
                            capacity_overflow, rotary_dim: int, rope_base: float) -> torch.Tensor:
    """One new token per row through the heads it joined; see `torch_mosa.ops.decode.sparse_decode`.

    Projects Q|K|V for the J given heads (gathering their weights), rotates at `position`, appends K, V to each
    joined head with room (the extra last cache slot takes the other rows' writes, so the update is one scatter),
    attends over each head's held tokens and sums score x (attention @ W_O) over the written heads.
    """
    batch, num_heads, slots, _ = cache_k.shape
    capacity = slots - 1
    all_heads = heads is None
    if all_heads:
        heads = torch.arange(num_heads, device=x.device).expand(batch, -1)
        qkv = torch.matmul(x, w_qkv).transpose(0, 1)  # [B, E, 3d]
    else:
        qkv = torch.matmul(x[:, None, None, :], w_qkv[heads]).squeeze(2)  # [B, J, 3d]
    head_dim = w_o.shape[1]
    q, k, v = qkv.split(head_dim, dim=-1)
    q = apply_rope(q, position, rotary_dim, rope_base)
    k = apply_rope(k, position, rotary_dim, rope_base)

    rows = torch.arange(batch, device=x.device)[:, None]
    slot = counts.gather(1, heads)
    written = joined & (slot < capacity)
    capacity_overflow += (joined & ~written).sum()
    slot = torch.where(written, slot, capacity)
    cache_k.index_put_((rows, heads, slot), k.to(cache_k.dtype))
    cache_v.index_put_((rows, heads, slot), v.to(cache_v.dtype))
    counts.scatter_add_(1, heads, written.long())

    if all_heads:
        keys, values, held = cache_k, cache_v, counts
    else:
        keys, values, held = cache_k[rows, heads], cache_v[rows, heads], counts.gather(1, heads)
    # slot 0 stays open for a head that holds nothing yet (a finite softmax); its output is multiplied by 0
    positions = torch.arange(slots, device=x.device)
    mask = ((positions < held.unsqueeze(-1)) | (positions == 0)).unsqueeze(2)
    attended = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask).squeeze(2)
    attended = attended * (scores * written).unsqueeze(-1).to(attended.dtype)  # [B, J, d]
    if all_heads:
        return torch.einsum("bed,edh->bh", attended, w_o)
    return torch.matmul(attended.unsqueeze(2), w_o[heads]).sum(dim=1).squeeze(1)  # [B, J, 1, h] -> [B, h]


def layer_decode_reference(x, position, dense_qkv, dense_w_o, dense_k, dense_v, key_real, mark_real: bool,
                           router_weight, thresholds, w_qkv, w_o, cache_k, cache_v, counts, capacity_overflow,
                           token_overflow, heads_per_token: int, rotary_dim: int, rope_base: float) -> torch.Tensor:
    """One new token per row through a layer's dense heads and MoSA heads; see `torch_mosa.ops.decode.layer_decode`
    (arguments as it unpacks them; an absent part's tensors are None).

    Dense heads: rotate the given Q|K|V at `position`, write K, V at `position` of the cache, mark the position
    real (mark_real), attend over the real positions up to it, and project through W_O (nn.Linear's layout).
    MoSA heads: router logits in x's dtype (as the router's nn.Linear returns them), routed as MoSAAttention's
    route_token routes (every head above its threshold, or at most heads_per_token of them by route_heads), then
    sparse_decode_reference."""
    out = None
    if dense_qkv is not None:
        batch, num_heads, max_len, head_dim = dense_k.shape
        q, k, v = dense_qkv.view(batch, num_heads, 1, 3 * head_dim).split(head_dim, dim=-1)
        q = apply_rope(q, position, rotary_dim, rope_base)
        k = apply_rope(k, position, rotary_dim, rope_base)
        dense_k.index_copy_(2, position, k.to(dense_k.dtype))
        dense_v.index_copy_(2, position, v.to(dense_v.dtype))
        if mark_real:
            key_real.index_fill_(1, position, True)
        slots = torch.arange(max_len, device=x.device)
        allowed = (key_real | (slots == position)) & (slots <= position)  # [B, max_len]
        attended = F.scaled_dot_product_attention(q.to(dense_k.dtype), dense_k, dense_v,
                                                  attn_mask=allowed[:, None, None, :])
        out = F.linear(attended.reshape(batch, num_heads * head_dim), dense_w_o.to(attended.dtype))
    if router_weight is not None:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        logits = torch.matmul(x.to(compute), router_weight.to(compute).t()).to(x.dtype)
        num_heads = router_weight.shape[0]
        if heads_per_token >= num_heads:
            heads, joined, scores = None, logits > thresholds, torch.sigmoid(logits)
        else:
            heads, joined, scores = route_heads_reference(logits, thresholds, token_overflow, heads_per_token)
        sparse = sparse_decode_reference(x, heads, joined, scores, position, w_qkv, w_o, cache_k, cache_v, counts,
                                         capacity_overflow, rotary_dim, rope_base)
        out = sparse if out is None else out + sparse.to(out.dtype)
    return out
