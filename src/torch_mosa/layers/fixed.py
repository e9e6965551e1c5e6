"""Fixed sparse attention baseline: every head attends over the strided tokens 0, s, 2s, ... with r = 1.

It is a MoSA head with a fixed selection (SPEC §2), so it shares MoSA's parameter layout and its op.
"""

from __future__ import annotations

import torch

from torch_mosa.checks import check_attention_input, check_positive_int, check_routing
from torch_mosa.layers.mosa import MoSAAttention, sort_selection


class FixedSparseAttention(MoSAAttention):
    """forward(x [B, T, h], attention_mask [B, T] or None) -> [B, T, h]; w_qkv [E, h, 3*d], w_o [E, d, h]."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 64, sparsity: int = 8,
                 rotate_fraction: float = 0.5, rope_base: float = 10000.0):
        check_positive_int("sparsity", sparsity)
        super().__init__(hidden_size, num_heads, head_dim, sparsity=sparsity, rotate_fraction=rotate_fraction,
                         rope_base=rope_base)
        del self.router, self.causal_threshold  # the selection is fixed: no router

    def reset_parameters(self) -> None:
        self.reset_head_parameters()

    def selection_size(self, seq_len: int) -> int:
        return len(range(0, seq_len, self.sparsity))

    def select(self, x: torch.Tensor, attention_mask=None, routing: str = "topk", include_first: bool | None = None):
        """The strided selection; it depends on positions only, so it is causal under either routing."""
        check_routing(routing)
        batch, seq_len, _ = x.shape
        positions = torch.arange(0, seq_len, self.sparsity, device=x.device)
        indices = positions.expand(batch, self.num_heads, -1)
        if attention_mask is None:
            return indices, torch.ones(indices.shape, dtype=x.dtype, device=x.device)
        valid = attention_mask.bool()[:, positions].unsqueeze(1).expand(-1, self.num_heads, -1)
        indices, valid, _ = sort_selection(indices, valid, seq_len)
        return indices, valid.to(x.dtype)

    def causal_route(self, x: torch.Tensor, attention_mask=None, positions=None, include_first: bool | None = None):
        """joined [B, E, T]: the tokens at positions that are multiples of the sparsity; scores are 1 there."""
        batch, seq_len, _ = x.shape
        positions = torch.arange(seq_len, device=x.device) if positions is None else positions
        joined = (positions % self.sparsity == 0).expand(batch, self.num_heads, seq_len)
        if attention_mask is not None:
            joined = joined & attention_mask.bool().unsqueeze(1)
        return joined, joined.to(x.dtype)

    def forward(self, x: torch.Tensor, attention_mask=None, routing: str = "topk") -> torch.Tensor:
        check_attention_input(x, self.hidden_size, self.w_qkv, attention_mask)
        return self.attend(x, *self.select(x, attention_mask, routing))
