"""MoSA: every head is an expert that picks its own top-k tokens (SPEC §1).

A forward pass, for each head e and sequence b:
  1. r = sigmoid(x @ w_r)                 router score of every token (sigmoid: heads do not compete)
  2. I = top-k positions of r             include_first forces token 0 in; padded tokens are never picked
  3. Q, K, V = x[I] @ W_Q, W_K, W_V       only k rows are projected: that is the saving
  4. RoPE at the ORIGINAL positions I
  5. causal attention among the k tokens by original position
  6. out = r[I] * (A @ W_O)               scaling by r is what gives the router its gradient
  7. scatter-add back to positions I      tokens no head picked get 0
Sorting I ascending changes nothing and turns step 5 into plain causal attention of length k, so steps 3-7 are one
op (`torch_mosa.ops.mosa.mosa_attention`) with a reference and a fused GPU kernel behind it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torch_mosa.checks import check_attention_input, check_positive_int, selection_size
from torch_mosa.layers.rope import rotary_dim_for
from torch_mosa.ops.mosa import mosa_attention


def sort_selection(indices: torch.Tensor, valid: torch.Tensor, seq_len: int):
    """Order each head's selection by position, with invalid slots last.

    indices, valid [..., k] -> (sorted indices, sorted valid, permutation). Invalid slots (padding) go last so
    that under the slot-causal mask no real token ever attends to them.
    """
    sort_key = indices + seq_len * (~valid).long()
    sorted_key, order = sort_key.sort(dim=-1)
    return sorted_key.remainder(seq_len), sorted_key < seq_len, order


def topk_selection(router_logits: torch.Tensor, k: int, include_first: bool, attention_mask=None):
    """Expert-choice top-k over the whole sequence.

    router_logits [B, T, E] -> indices [B, E, k] sorted by position (padding slots last), scores [B, E, k]
    (sigmoid of the logits, 0 for padding slots). Ranking by logits equals ranking by sigmoid and keeps more
    resolution in low precision.
    """
    seq_len = router_logits.shape[1]
    priority = router_logits.detach().transpose(1, 2)
    if attention_mask is not None:
        real = attention_mask.bool().unsqueeze(1)
        priority = priority.masked_fill(~real, float("-inf"))
    if include_first:
        priority = priority.clone()
        priority[..., 0] = float("inf")
    indices = priority.topk(k, dim=-1).indices
    if attention_mask is None:
        valid = torch.ones_like(indices, dtype=torch.bool)
    else:
        valid = attention_mask.bool().unsqueeze(1).expand(-1, indices.shape[1], -1).gather(-1, indices)
    indices, valid, _ = sort_selection(indices, valid, seq_len)
    scores = torch.sigmoid(router_logits.transpose(1, 2).gather(-1, indices)) * valid
    return indices, scores


class MoSAAttention(nn.Module):
    """`num_heads` MoSA heads, summed. Exactly one of `sparsity` (k = max(2, T // sparsity)) or a fixed `k`.

    Parameters (the public reference code's layout): router.weight [E, h], w_qkv [E, h, 3*head_dim] (Q|K|V),
    w_o [E, head_dim, h]. forward(x [B, T, h], attention_mask [B, T] or None) -> [B, T, h].
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int = 64,
        sparsity: int | None = None,
        k: int | None = None,
        include_first: bool = False,
        rotate_fraction: float = 0.5,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_heads", num_heads)
        check_positive_int("head_dim", head_dim)
        if (sparsity is None) == (k is None):
            raise ValueError(f"give exactly one of sparsity or k, got sparsity={sparsity!r}, k={k!r}")
        if sparsity is not None:
            check_positive_int("sparsity", sparsity)
        if k is not None:
            check_positive_int("k", k, minimum=2 if include_first else 1)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.sparsity, self.k, self.include_first = sparsity, k, include_first
        self.rotary_dim = rotary_dim_for(head_dim, rotate_fraction)
        self.rope_base = rope_base
        self.router = nn.Linear(hidden_size, num_heads, bias=False)
        self.w_qkv = nn.Parameter(torch.empty(num_heads, hidden_size, 3 * head_dim))
        self.w_o = nn.Parameter(torch.empty(num_heads, head_dim, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        self.reset_head_parameters()

    def reset_head_parameters(self) -> None:
        """The public reference code's init: uniform +-1/sqrt(3d) for w_qkv, +-1/sqrt(h*E) for w_o."""
        bound_qkv = 1.0 / math.sqrt(3 * self.head_dim)
        nn.init.uniform_(self.w_qkv, -bound_qkv, bound_qkv)
        bound_o = 1.0 / math.sqrt(self.hidden_size * self.num_heads)
        nn.init.uniform_(self.w_o, -bound_o, bound_o)

    def selection_size(self, seq_len: int) -> int:
        return selection_size(seq_len, self.sparsity, self.k)

    def select(self, x: torch.Tensor, attention_mask=None, include_first: bool | None = None):
        """Route: x [B, T, h] -> indices [B, E, k] (sorted), scores [B, E, k]."""
        include_first = self.include_first if include_first is None else include_first
        return topk_selection(self.router(x), self.selection_size(x.shape[1]), include_first, attention_mask)

    def forward(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        check_attention_input(x, self.hidden_size, self.w_qkv, attention_mask)
        if self.include_first and x.shape[1] < 2:
            raise ValueError(
                f"include_first=True needs seq_len >= 2 (token 0 plus routed tokens), got seq_len={x.shape[1]}"
            )
        indices, scores = self.select(x, attention_mask)
        return self.attend(x, indices, scores)

    def attend(self, x: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Steps 3-7 for a given selection (indices sorted by position, slot i attends to slots <= i)."""
        w_qkv, w_o = self.w_qkv, self.w_o
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w_qkv, w_o = x.to(dtype), w_qkv.to(dtype), w_o.to(dtype)
        return mosa_attention(x, w_qkv, w_o, indices, scores, rotary_dim=self.rotary_dim, rope_base=self.rope_base)

    def extra_repr(self) -> str:
        size = f"sparsity={self.sparsity}" if self.sparsity is not None else f"k={self.k}"
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim}, {size}, "
                f"include_first={self.include_first}, rotary_dim={self.rotary_dim}")
