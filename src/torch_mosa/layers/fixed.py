"""Fixed sparse attention baseline: every head attends over the strided tokens f, f+s, f+2s, ... with r = 1, where f
is the row's first real token (0 without left padding), so a left-padded prompt sees what it would see alone.

With `per_head_offsets` head e starts at f + (e mod s) instead: together the heads cover every token, as MoSA's heads
can, with MoSA's parameters, FLOPs and heads per token but no content routing (the fair fixed-pattern control).

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
                 rotate_fraction: float = 0.5, rope_base: float = 10000.0, per_head_offsets: bool = False):
        check_positive_int("sparsity", sparsity)
        if not isinstance(per_head_offsets, bool):
            raise ValueError(f"per_head_offsets must be True or False, got {per_head_offsets!r}")
        super().__init__(hidden_size, num_heads, head_dim, rotate_fraction, rope_base)
        self.sparsity, self.per_head_offsets = sparsity, per_head_offsets
        self.reset_parameters()

    def head_offsets(self, device) -> torch.Tensor:
        """[E, 1] where each head's stride starts (e mod s with per_head_offsets), or [1, 1] zeros when shared."""
        if not self.per_head_offsets:
            return torch.zeros(1, 1, dtype=torch.long, device=device)
        return (torch.arange(self.num_heads, device=device) % self.sparsity)[:, None]

    def reset_parameters(self) -> None:
        self.reset_head_parameters()

    def selection_size(self, seq_len: int) -> int:
        """Tokens per head under top-k routing: k = max(2, T // sparsity), the count the FLOPs use."""
        return selection_size(seq_len, self.sparsity, None)

    def strided(self, positions: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The one rule: position p joins head e iff p - first - offset_e is a non-negative multiple of the sparsity.
        positions [T], [1] or [B, T] (offsets inside packed documents, first 0), first [B] -> [B, E', T] bool,
        E' = E with per-head offsets, else 1 (every head alike)."""
        offset = positions - first[:, None]  # [B, T]
        offset = offset[:, None, :] - self.head_offsets(offset.device)
        return (offset >= 0) & (offset % self.sparsity == 0)

    def causal_route(self, x: torch.Tensor, attention_mask=None, documents=None):
        """joined [B, E, T] (the strided tokens of each row, or of each packed document), scores [B, E, T] (1 there,
        else 0)."""
        batch, seq_len, _ = x.shape
        if documents is not None:  # each document's stride, cut at its own k_d as a row of that length would be
            sizes, _ = documents.selection_sizes(self.sparsity, None)
            joined = self.strided(documents.offsets, torch.zeros(batch, dtype=torch.long, device=x.device))
            rank = (documents.offsets[:, None, :] - self.head_offsets(x.device)) // self.sparsity
            joined = joined & (rank < sizes[:, None, :])
        else:
            first = first_real_position(attention_mask, batch, x.device)
            joined = self.strided(torch.arange(seq_len, device=x.device), first)
        if attention_mask is not None:
            joined = joined & attention_mask.bool()[:, None, :]
        joined = joined.expand(-1, self.num_heads, -1)
        return joined, joined.to(x.dtype)

    def document_selections(self) -> list[tuple[int | None, int | None]]:
        """The (sparsity, k) keys this layer reads from a DocumentLayout (see DocumentLayout.prepare)."""
        return [(self.sparsity, None)]

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
        """All heads (None): each joins when the position is on its stride of the row."""
        joined = self.strided(position, cache.first)[..., 0].expand(-1, self.num_heads)
        return None, joined, joined.to(x.dtype)

    def forward(self, x: torch.Tensor, attention_mask=None, routing: str = "topk", documents=None) -> torch.Tensor:
        check_attention_input(x, self.hidden_size, self.w_qkv, attention_mask, documents)
        return self.attend(x, *self.select(x, attention_mask, routing, documents), documents)
