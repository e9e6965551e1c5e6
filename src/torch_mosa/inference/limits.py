"""Causal limits of MoSA heads for generation: how many tokens a head keeps (its KV-cache slots) and how many heads
one token joins (the heads a decode step computes). Both are fixed numbers, so caches are preallocated and decode
shapes never change; joins beyond them are dropped alike in the causal forward, prefill and decode, and counted.
"""

from __future__ import annotations

import math


def set_causal_limits(model, capacity: int | None = None, heads_per_token: int | None = None) -> None:
    """The same limits on every MoSA layer of `model` (None lifts a limit); see MoSAAttention.set_causal_limits."""
    for layer in model.mosa_layers:
        layer.set_causal_limits(capacity, heads_per_token)


def suggested_causal_limits(model, max_len: int, spread: float = 4.0) -> dict:
    """Limits that a calibrated model rarely hits over `max_len` tokens: the expected count plus `spread` standard
    deviations of a Poisson count, plus one, for tokens per head (mean max_len / sparsity) and heads per token
    (mean E / sparsity). Returns {"capacity", "heads_per_token"} (None where the model has no MoSA layers)."""
    if not model.mosa_layers:
        return {"capacity": None, "heads_per_token": None}
    layer = model.mosa_layers[0]
    per_head = layer.selection_size(max_len) if layer.k is None else layer.k
    per_token = layer.num_heads * per_head / max_len

    def bound(mean):
        return math.ceil(mean + spread * math.sqrt(mean)) + 1

    return {"capacity": min(max_len, bound(per_head)), "heads_per_token": min(layer.num_heads, bound(per_token))}
