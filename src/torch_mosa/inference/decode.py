"""Prefill and one-token decode of a whole model (gpt-fast style: two separate functions).

Each attention layer owns its cache and its `prefill` / `decode_step` (layers/dense.py, local.py, sparse.py,
hybrid.py); this module only runs the blocks around them. `decode_one_token` reads nothing back to the host, so it
can be captured as a CUDA graph (inference/graphs.py).
"""

from __future__ import annotations

import torch

from torch_mosa.inference.cache import ModelCache


def cache_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype keys and values arrive in: autocast's on `device` when it is on, else the parameters'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def new_cache(model, batch: int, max_len: int, dtype, device) -> ModelCache:
    """Every layer's preallocated cache for `batch` sequences of up to `max_len` tokens."""
    return ModelCache(block.attn.new_cache(batch, max_len, dtype, device) for block in model.blocks)


def prefilled_cache(model, input_ids: torch.Tensor, max_len: int, attention_mask=None):
    """Caches for `max_len` tokens, filled by a prefill of input_ids [B, T]: -> (logits [B, T, vocab], cache)."""
    cache = new_cache(model, input_ids.shape[0], max_len, cache_dtype(model, input_ids.device), input_ids.device)
    return prefill(model, input_ids, attention_mask, cache), cache


def prefill(model, input_ids: torch.Tensor, attention_mask, cache: ModelCache) -> torch.Tensor:
    """Causal forward over the prompt input_ids [B, T] (left-padded rows: attention_mask [B, T], None = all real),
    filling `cache`; returns logits [B, T, vocab]."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    x = model.embed(input_ids)
    for block, layer_cache in zip(model.blocks, cache):
        x = x + block.attn.prefill(block.attn_norm(x), attention_mask, layer_cache)
        x = x + block.ffn(block.ffn_norm(x))
    return model.lm_head(model.final_norm(x))


def decode_one_token(model, tokens: torch.Tensor, position, cache: ModelCache) -> torch.Tensor:
    """tokens [B, 1] at `position` (an int, or a [1] long tensor on the device: no host sync) -> logits [B, vocab],
    appending to every cache."""
    if not isinstance(position, torch.Tensor):
        position = torch.tensor([position], device=tokens.device)
    x = model.embed(tokens)
    for block, layer_cache in zip(model.blocks, cache):
        x = x + block.attn.decode_step(block.attn_norm(x), position, layer_cache)
        x = x + block.ffn(block.ffn_norm(x))
    return model.lm_head(model.final_norm(x))[:, -1]
