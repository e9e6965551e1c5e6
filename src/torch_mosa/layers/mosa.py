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

Step 2 looks at the whole sequence, so whether token t is picked depends on later tokens: fine for training and
the paper's evaluation, not for generation. `routing="causal"` replaces it with a per-head threshold on the router
logit, decided when the token arrives (SPEC §5); `router_aux_loss` teaches the logits to predict top-k membership.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torch_mosa.checks import (check_attention_input, check_positive_int, check_routing, first_real_position,
                               selection_size)
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
    resolution in low precision. include_first forces each row's first real token (position 0 unless left-padded).
    """
    batch, seq_len, _ = router_logits.shape
    priority = router_logits.detach().transpose(1, 2)
    if attention_mask is not None:
        priority = priority.masked_fill(~attention_mask.bool().unsqueeze(1), float("-inf"))
    if include_first:
        first = first_real_position(attention_mask, batch, router_logits.device)
        priority = priority.scatter(-1, first.view(batch, 1, 1).expand(-1, priority.shape[1], 1), float("inf"))
    indices = priority.topk(k, dim=-1).indices
    if attention_mask is None:
        valid = torch.ones_like(indices, dtype=torch.bool)
    else:
        valid = attention_mask.bool().unsqueeze(1).expand(-1, indices.shape[1], -1).gather(-1, indices)
    indices, valid, _ = sort_selection(indices, valid, seq_len)
    scores = torch.sigmoid(router_logits.transpose(1, 2).gather(-1, indices)) * valid
    return indices, scores


def causal_membership(router_logits: torch.Tensor, thresholds: torch.Tensor, include_first: bool,
                      attention_mask=None) -> torch.Tensor:
    """Causal routing: token t joins head e iff its logit exceeds the head's threshold (or it is the forced first
    token). router_logits [B, T, E], thresholds [E] -> joined [B, E, T] bool. Depends on token t alone."""
    batch, seq_len, _ = router_logits.shape
    joined = (router_logits.detach() > thresholds).transpose(1, 2)
    if include_first:
        first = first_real_position(attention_mask, batch, router_logits.device)
        joined = joined | (torch.arange(seq_len, device=joined.device) == first[:, None]).unsqueeze(1)
    if attention_mask is not None:
        joined = joined & attention_mask.bool().unsqueeze(1)
    return joined


def membership_selection(joined: torch.Tensor, token_scores: torch.Tensor):
    """Membership [B, E, T] and per-token scores [B, E, T] -> indices, scores [B, E, T] for the MoSA op: each head's
    members in position order, then its other tokens with score 0.

    The width stays T rather than the largest member count: a width that depended on later tokens would change the
    shapes of the reductions and so, by rounding, earlier outputs; at full width causality holds bit for bit.
    """
    batch, num_heads, seq_len = joined.shape
    positions = torch.arange(seq_len, device=joined.device).expand(batch, num_heads, -1)
    indices, valid, _ = sort_selection(positions, joined, seq_len)
    return indices, token_scores.gather(-1, indices) * valid


class MoSAAttention(nn.Module):
    """`num_heads` MoSA heads, summed. Exactly one of `sparsity` (k = max(2, T // sparsity)) or a fixed `k`.

    Parameters (the public reference code's layout): router.weight [E, h], w_qkv [E, h, 3*head_dim] (Q|K|V),
    w_o [E, head_dim, h]; buffer causal_threshold [E] (router-logit thresholds of causal routing).
    forward(x [B, T, h], attention_mask [B, T] or None, routing="topk"|"causal") -> [B, T, h].
    With `router_aux_loss = True`, each top-k forward leaves `last_router_aux_loss`: the binary cross-entropy of
    the router logits against top-k membership, for the model to add to its loss.
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
        self.register_buffer("causal_threshold", torch.zeros(num_heads))
        self.router_aux_loss = False
        self.last_router_aux_loss = None
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

    def select(self, x: torch.Tensor, attention_mask=None, routing: str = "topk", include_first: bool | None = None):
        """Route: x [B, T, h] -> indices [B, E, K] (sorted by position), scores [B, E, K]."""
        include_first = self.include_first if include_first is None else include_first
        if check_routing(routing) == "causal":
            return membership_selection(*self.causal_route(x, attention_mask, include_first=include_first))
        logits = self.router(x)
        indices, scores = topk_selection(logits, self.selection_size(x.shape[1]), include_first, attention_mask)
        if self.router_aux_loss and torch.is_grad_enabled():
            self.last_router_aux_loss = router_membership_loss(logits, indices, scores, attention_mask)
        return indices, scores

    def causal_route(self, x: torch.Tensor, attention_mask=None, positions=None, include_first: bool | None = None):
        """Causal routing of every token on its own: x [B, T, h] -> joined [B, E, T] bool, scores [B, E, T]
        (sigmoid router score, 0 where not joined). `positions` [T] are unused here (fixed heads need them)."""
        include_first = self.include_first if include_first is None else include_first
        logits = self.router(x)
        joined = causal_membership(logits, self.causal_threshold, include_first, attention_mask)
        return joined, torch.sigmoid(logits).transpose(1, 2) * joined

    def forward(self, x: torch.Tensor, attention_mask=None, routing: str = "topk") -> torch.Tensor:
        check_attention_input(x, self.hidden_size, self.w_qkv, attention_mask)
        if self.include_first and routing == "topk" and x.shape[1] < 2:
            raise ValueError(
                f"include_first=True needs seq_len >= 2 (token 0 plus routed tokens), got seq_len={x.shape[1]}"
            )
        return self.attend(x, *self.select(x, attention_mask, routing))

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


def router_membership_loss(router_logits: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor,
                           attention_mask=None) -> torch.Tensor:
    """Binary cross-entropy of router logits [B, T, E] against top-k membership (as Mixture-of-Depths trains its
    router to predict its own top-k), averaged over real tokens and heads."""
    member = torch.zeros(router_logits.shape[0], router_logits.shape[2], router_logits.shape[1],
                         device=router_logits.device, dtype=router_logits.dtype)
    member.scatter_(-1, indices, (scores > 0).to(member.dtype))
    losses = F.binary_cross_entropy_with_logits(router_logits.transpose(1, 2).float(), member.float(), reduction="none")
    if attention_mask is None:
        return losses.mean()
    real = attention_mask.bool().unsqueeze(1).expand_as(losses)
    return losses[real].mean()
