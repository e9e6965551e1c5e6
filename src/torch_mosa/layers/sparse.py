"""Heads that each attend over their own selection of tokens (SPEC §1 steps 3-7), the base of MoSA heads (a learned
router picks the tokens) and fixed heads (a stride picks them).

The base holds what both kinds share: the per-head projections w_qkv [E, h, 3*d] and w_o [E, d, h], the call of the
MoSA op on a selection, and causal inference (SPEC §5) with a per-head KV cache. A subclass says which tokens join
which head: `select` for the full forward, `causal_route` for a whole prompt under causal routing and `route_token`
for one new token during decoding. Both causal rules depend on token t and the tokens before it only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torch_mosa.checks import check_head_sizes
from torch_mosa.ops.decode import sparse_decode
from torch_mosa.ops.mosa import mosa_attention
from torch_mosa.ops.rope import apply_rope, rotary_dim_for
from torch_mosa.ops.selection.reference import sort_selection


def membership_selection(joined: torch.Tensor, token_scores: torch.Tensor, width: int | None = None):
    """Membership [B, E, T] and per-token scores [B, E, T] -> indices, scores [B, E, width] for the MoSA op: each
    head's members in position order, then its other tokens with score 0. `width` (default T) must be at least the
    largest member count.

    The width must not depend on the tokens (pass T, or a fixed capacity): a width that followed the largest member
    count would change the shapes of the reductions and so, by rounding, earlier outputs when later tokens change.
    """
    batch, num_heads, seq_len = joined.shape
    positions = torch.arange(seq_len, device=joined.device).expand(batch, num_heads, -1)
    indices, valid, _ = sort_selection(positions, joined, seq_len)
    if width is not None:
        indices, valid = indices[..., :width], valid[..., :width]
    return indices, token_scores.gather(-1, indices) * valid


def bucketed_width(largest: int, seq_len: int, bucket: int = 16) -> int:
    """The largest member count rounded up to a multiple of `bucket` (at most seq_len), so prefills of similar
    prompts share shapes."""
    return min(seq_len, max(1, -(-largest // bucket) * bucket))


class SparseHeads(nn.Module):
    """`num_heads` heads of head_dim d over their own token selections, summed into [B, T, h].

    Subclasses define `select(x, attention_mask, routing, documents)` -> indices, scores [B, E, K] (sorted by
    position; `documents` a DocumentLayout of packed documents or None),
    `causal_route(x, attention_mask)` -> joined [B, E, T] bool and scores [B, E, T], `causal_width(seq_len)` (the
    selection width of the causal forward), `cache_capacity(max_len)` (KV slots per head) and
    `route_token(x [B, h], position, cache)` -> heads [B, J] or None (all heads), joined [B, J], scores [B, J].
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 64, rotate_fraction: float = 0.5,
                 rope_base: float = 10000.0):
        super().__init__()
        check_head_sizes(hidden_size, num_heads, head_dim)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.rotary_dim = rotary_dim_for(head_dim, rotate_fraction)
        self.rope_base = rope_base
        self.w_qkv = nn.Parameter(torch.empty(num_heads, hidden_size, 3 * head_dim))
        self.w_o = nn.Parameter(torch.empty(num_heads, head_dim, hidden_size))
        self.last_causal_overflow = None  # joins dropped by causal limits in the last causal_route (MoSA only)

    def reset_head_parameters(self) -> None:
        """The public reference code's init: uniform +-1/sqrt(3d) for w_qkv, +-1/sqrt(h*E) for w_o."""
        bound_qkv = 1.0 / math.sqrt(3 * self.head_dim)
        nn.init.uniform_(self.w_qkv, -bound_qkv, bound_qkv)
        bound_o = 1.0 / math.sqrt(self.hidden_size * self.num_heads)
        nn.init.uniform_(self.w_o, -bound_o, bound_o)

    def _weights(self, x: torch.Tensor):
        """x, w_qkv, w_o in autocast's dtype when autocast is on, else as they are."""
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            return x.to(dtype), self.w_qkv.to(dtype), self.w_o.to(dtype)
        return x, self.w_qkv, self.w_o

    def scores_router_weight(self) -> torch.Tensor | None:
        """The router weight w whose sigmoid(x . w[e]) the selection's scores are, or None when the scores are fixed
        (fixed heads: 1 on their stride)."""
        return None

    def attend(self, x: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor, documents=None) -> torch.Tensor:
        """Steps 3-7 for a given selection (indices sorted by position, slot i attends to slots <= i; with packed
        `documents`, a DocumentLayout, only to slots of its own document, rotated by in-document positions). With a
        router, the op computes the router's gradient itself from the selected rows (no dense [B, T, E] gradient),
        so the scores enter as values only."""
        x, w_qkv, w_o = self._weights(x)
        router_weight = self.scores_router_weight()  # the op rounds it to x's dtype (its gradient stays float32)
        if router_weight is not None:
            scores = scores.detach()
        packed = {} if documents is None else dict(positions=documents.rope_positions, document_ids=documents.ids)
        return mosa_attention(x, w_qkv, w_o, indices, scores, rotary_dim=self.rotary_dim, rope_base=self.rope_base,
                              router_weight=router_weight, **packed)

    # ---- causal inference: a per-head cache, prefill of a prompt, one decode step ----

    def new_cache(self, batch: int, max_len: int, dtype, device) -> "SparseCache":
        from torch_mosa.inference.cache import SparseCache

        return SparseCache(batch, self.num_heads, self.head_dim, self.cache_capacity(max_len), dtype, device)

    def prefill(self, x: torch.Tensor, attention_mask: torch.Tensor, cache) -> torch.Tensor:
        """Causal forward of the prompt x [B, T, h] (left-padded rows by attention_mask [B, T]) at member width,
        storing each head's keys and values in `cache`. Returns [B, T, h]."""
        joined, scores = self.causal_route(x, attention_mask)
        counts = joined.sum(-1)
        largest = int(counts.max())  # one host read per layer in prefill; none in decode
        if largest > cache.capacity:
            raise ValueError(f"a head joined {largest} prompt tokens but the cache holds capacity={cache.capacity} "
                             "per head: build the cache with a larger max_len, or set a causal capacity on the layer")
        width = bucketed_width(largest, x.shape[1])
        indices, selected_scores = membership_selection(joined, scores, width)
        out = self.attend(x, indices, selected_scores)
        xs, w_qkv, _ = self._weights(x)
        batch, num_heads, width = indices.shape
        gathered = xs.gather(1, indices.reshape(batch, -1, 1).expand(-1, -1, x.shape[-1]))
        kv = torch.einsum("benh,ehd->bend", gathered.view(batch, num_heads, width, -1), w_qkv[..., self.head_dim:])
        k, v = kv.split(self.head_dim, dim=-1)
        cache.fill(apply_rope(k, indices, self.rotary_dim, self.rope_base), v, counts, attention_mask)
        if self.last_causal_overflow is not None:
            cache.capacity_overflow += self.last_causal_overflow["capacity"]
            cache.token_overflow += self.last_causal_overflow["heads_per_token"]
        return out

    def decode_step(self, x: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        """One new token per row, x [B, 1, h] at `position` (a [1] long tensor: no host sync, CUDA-graph safe).

        Routes first, then projects, attends and outputs only the heads the token joined: J head slots per row,
        J = route_token's width (ops/decode: on CUDA two fused kernels that read the joined heads' weights and cache
        rows in place). Returns [B, 1, h]."""
        heads, joined, scores = self.route_token(x[:, 0], position, cache)
        hx, w_qkv, w_o = self._weights(x[:, 0])
        out = sparse_decode(hx, heads, joined, scores, position, w_qkv, w_o, cache.k, cache.v, cache.counts,
                            cache.capacity_overflow, rotary_dim=self.rotary_dim, rope_base=self.rope_base)
        return out.unsqueeze(1)
