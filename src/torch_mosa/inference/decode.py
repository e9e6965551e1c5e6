"""Prefill and one-token decode through every layer kind with its cache (gpt-fast style: two separate functions).

Prefill runs the model's own batched forward under causal routing (the fast path on CUDA) and fills each cache on
the side; decode computes one new token per sequence against the caches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_mosa.layers.dense import DenseAttention
from torch_mosa.layers.hybrid import HybridAttention
from torch_mosa.layers.local import LocalAttention
from torch_mosa.layers.mosa import MoSAAttention, membership_selection
from torch_mosa.layers.rope import apply_rope
from torch_mosa.layers.routing import RoutingAttention
from torch_mosa.inference.cache import DenseCache, LayerCache, LocalCache, ModelCache, MoSACache


def attention_parts(attn) -> list:
    return attn.parts() if isinstance(attn, HybridAttention) else [attn]


def cache_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype keys and values arrive in: autocast's on `device` when it is on, else the parameters'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def new_cache(model, batch: int, max_len: int, dtype, device) -> ModelCache:
    cache = ModelCache()
    for block in model.blocks:
        layer = LayerCache()
        for part in attention_parts(block.attn):
            if isinstance(part, RoutingAttention):
                raise ValueError("models with routing attention cannot generate: Routing Transformer clusters take "
                                 "top-k over the whole sequence and have no causal mode")
            if isinstance(part, LocalAttention):
                layer.local = LocalCache(batch, part.num_heads, part.head_dim, part.window, dtype, device)
            elif isinstance(part, DenseAttention):
                layer.dense = DenseCache(batch, part.num_heads, part.head_dim, max_len, dtype, device)
            else:
                layer.sparse = MoSACache(batch, part.num_heads, part.head_dim, dtype, device)
        cache.append(layer)
    return cache


def prefilled_cache(model, input_ids: torch.Tensor, max_len: int, attention_mask=None):
    """Caches for `max_len` tokens, filled by a prefill of input_ids [B, T]: -> (logits [B, T, vocab], cache)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    cache = new_cache(model, input_ids.shape[0], max_len, cache_dtype(model, input_ids.device), input_ids.device)
    return prefill(model, input_ids, attention_mask, cache), cache


def _cache_of(layer_cache: LayerCache, part):
    if isinstance(part, LocalAttention):
        return layer_cache.local
    return layer_cache.dense if isinstance(part, DenseAttention) else layer_cache.sparse


def _mosa_qkv(part: MoSAAttention, x_selected: torch.Tensor, positions: torch.Tensor):
    """Per-head rows x_selected [B, E, n, h] at positions [B, E, n] -> q, k (RoPE applied), v [B, E, n, d]."""
    qkv = torch.einsum("benh,ehd->bend", x_selected, part.w_qkv.to(x_selected.dtype))
    q, k, v = qkv.split(part.head_dim, dim=-1)
    return (apply_rope(q, positions, part.rotary_dim, part.rope_base),
            apply_rope(k, positions, part.rotary_dim, part.rope_base), v)


def _fill(part, cache, h: torch.Tensor, attention_mask: torch.Tensor) -> None:
    seq_len = h.shape[1]
    positions = torch.arange(seq_len, device=h.device)
    if isinstance(part, DenseAttention):  # dense and local
        _, k, v = part.project_qkv(h, positions)
        cache.append(k, v, attention_mask.bool())
        return
    joined = part.causal_route(h, attention_mask)[0]
    counts = joined.sum(-1, keepdim=True)
    width = max(1, int(counts.max()))
    indices = membership_selection(joined, joined)[0][..., :width]  # members first, in position order
    valid = torch.arange(width, device=h.device) < counts
    batch, num_heads = indices.shape[:2]
    selected = h.gather(1, indices.reshape(batch, -1, 1).expand(-1, -1, h.shape[-1])).view(batch, num_heads, width, -1)
    _, k, v = _mosa_qkv(part, selected, indices)
    cache.fill(k, v, valid)


def _step(part, cache, h: torch.Tensor, position: int) -> torch.Tensor:
    """h [B, 1, hidden] at `position` -> this part's output [B, 1, hidden]; appends the token to the cache."""
    pos = torch.tensor([position], device=h.device)
    if isinstance(part, DenseAttention):  # dense and local
        q, k, v = part.project_qkv(h, pos)
        cache.append(k, v, torch.ones(h.shape[0], 1, dtype=torch.bool, device=h.device))
        keys, values, mask = cache.keys_values_mask()
        return part.merge_heads(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))
    joined, scores = part.causal_route(h, positions=pos, include_first=False)  # [B, E, 1]
    q, k, v = _mosa_qkv(part, h.unsqueeze(1).expand(-1, part.num_heads, -1, -1), pos)
    cache.append(k[:, :, 0], v[:, :, 0], joined[..., 0])
    keys, values, mask = cache.keys_values_mask()
    attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, E, 1, d]
    out = torch.einsum("bend,edh->bneh", attended * scores.unsqueeze(-1).to(h.dtype), part.w_o.to(h.dtype))
    return out.sum(dim=2)


def _run_blocks(model, x: torch.Tensor, attention) -> torch.Tensor:
    """The LM's pre-LayerNorm blocks with `attention(block_index, attn, h)` in place of the attention call."""
    for index, block in enumerate(model.blocks):
        x = x + attention(index, block.attn, block.attn_norm(x))
        x = x + block.ffn(block.ffn_norm(x))
    return model.lm_head(model.final_norm(x))


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: ModelCache) -> torch.Tensor:
    """Causal forward over the prompt [B, T] filling `cache`; returns logits [B, T, vocab]."""

    def attention(index, attn, h):
        for part in attention_parts(attn):
            _fill(part, _cache_of(cache[index], part), h, attention_mask)
        return attn(h, attention_mask, "causal")

    return _run_blocks(model, model.embed(input_ids), attention)


def decode_one_token(model, tokens: torch.Tensor, position: int, cache: ModelCache) -> torch.Tensor:
    """tokens [B, 1] at `position` -> logits [B, vocab], appending to every cache."""

    def attention(index, attn, h):
        parts = attention_parts(attn)
        return sum(_step(part, _cache_of(cache[index], part), h, position) for part in parts)

    return _run_blocks(model, model.embed(tokens), attention)[:, -1]
