"""Fixed sparse attention baseline: every head attends over the strided tokens f, f+s, f+2s, ... with r = 1, where f
is the row's first real token (0 without left padding), so a left-padded prompt sees what it would see alone.

It is a sparse head with a fixed selection (SPEC §2): it shares MoSA's parameter layout and op through
SparseHeads, and has no router.
"""

from __future__ import annotations

import torch

from torch_mosa.checks import (check_attention_input, check_positive_int, check_routing, first_real_position,
                               selection_size)
from torch_mosa.layers.sparse import SparseHeads, membership_selection


class FixedSparseAttention(SparseHeads):
    """forward(x [B, T, h], attention_mask [B, T] or None) -> [B, T, h]; w_qkv [E, h, 3*d], w_o [E, d, h]."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 64, sparsity: int = 8,
                 rotate_fraction: float = 0.5, rope_base: float = 10000.0):
        check_positive_int("sparsity", sparsity)
        super().__init__(hidden_size, num_heads, head_dim, rotate_fraction, rope_base)
        self.sparsity = sparsity
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.reset_head_parameters()

    def selection_size(self, seq_len: int) -> int:
        """Tokens per head under top-k routing: k = max(2, T // sparsity), the count the FLOPs use."""
        return selection_size(seq_len, self.sparsity, None)

    def strided(self, positions: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The one rule: position p joins every head iff p - first is a non-negative multiple of the sparsity.
        positions [T] or [1], first [B] -> [B, T] bool."""
        offset = positions - first[:, None]
        return (offset >= 0) & (offset % self.sparsity == 0)

    def causal_route(self, x: torch.Tensor, attention_mask=None, documents=None):
        """joined [B, E, T] (the strided tokens of each row, or of each packed document), scores [B, E, T] (1 there,
        else 0)."""
        batch, seq_len, _ = x.shape
        if documents is not None:  # each document's stride, cut at its own k_d as a row of that length would be
            sizes, _ = documents.selection_sizes(self.sparsity, None)
            joined = (documents.offsets % self.sparsity == 0) & (documents.offsets // self.sparsity < sizes)
        else:
            first = first_real_position(attention_mask, batch, x.device)
            joined = self.strided(torch.arange(seq_len, device=x.device), first)
        if attention_mask is not None:
            joined = joined & attention_mask.bool()
        joined = joined.unsqueeze(1).expand(-1, self.num_heads, -1)
        return joined, joined.to(x.dtype)

    def causal_width(self, seq_len: int) -> int:
        return self.selection_size(seq_len)

    def cache_capacity(self, max_len: int) -> int:
        return self.selection_size(max_len)

    def select(self, x: torch.Tensor, attention_mask=None, routing: str = "topk", documents=None):
        """The strided selection; it depends on positions only, so it is causal under either routing. Packed
        documents each take their stride up to their own k_d, so the width is the layout's selection width."""
        check_routing(routing)
        joined, scores = self.causal_route(x, attention_mask, documents)
        width = (self.causal_width(x.shape[1]) if documents is None
                 else documents.selection_sizes(self.sparsity, None)[1])
        return membership_selection(joined, scores, width)

    def route_token(self, x: torch.Tensor, position: torch.Tensor, cache):
        """All heads (None) join together when the position is on the row's stride."""
        joined = self.strided(position, cache.first).expand(-1, self.num_heads)
        return None, joined, joined.to(x.dtype)

    def forward(self, x: torch.Tensor, attention_mask=None, routing: str = "topk", documents=None) -> torch.Tensor:
        check_attention_input(x, self.hidden_size, self.w_qkv, attention_mask, documents)
        return self.attend(x, *self.select(x, attention_mask, routing, documents), documents)
