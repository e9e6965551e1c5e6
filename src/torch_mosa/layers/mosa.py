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

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from torch_mosa.checks import check_attention_input, check_positive_int, check_routing, first_real_position, \
    selection_size
from torch_mosa.layers.sparse import SparseHeads, membership_selection
from torch_mosa.ops.decode import MoSADecodeInputs, largest_margin_heads, route_heads
from torch_mosa.ops.selection import router_logits, topk_route, topk_route_documents


def heads_above_threshold(router_logits: torch.Tensor, thresholds: torch.Tensor, heads_per_token: int | None):
    """The per-token causal rule: router_logits [..., E], thresholds [E] -> (joined [..., E] bool, dropped [..., E]
    bool). A token joins the heads whose logit passes the threshold; with `heads_per_token` = J it joins at most the
    J of them with the largest margin (logit - threshold) and the others are `dropped`. The full forward calls this
    and decode (`MoSAAttention.route_token`) the same `largest_margin_heads`, so they choose alike."""
    if heads_per_token is None or heads_per_token >= router_logits.shape[-1]:
        above = router_logits.detach() > thresholds
        return above, torch.zeros_like(above)
    above, top = largest_margin_heads(router_logits, thresholds, heads_per_token)
    joined = torch.zeros_like(above).scatter(-1, top, True) & above
    return joined, above & ~joined


def causal_membership(router_logits: torch.Tensor, thresholds: torch.Tensor, include_first: bool,
                      attention_mask=None, heads_per_token: int | None = None, capacity: int | None = None,
                      documents=None):
    """Causal routing of a whole sequence: router_logits [B, T, E], thresholds [E] -> (joined [B, E, T] bool,
    overflow {"heads_per_token", "capacity"}: 0-dim long tensors counting (token, head) joins dropped by each limit).

    Token t joins head e iff its logit passes the threshold (at most `heads_per_token` heads per token, largest
    margins first) or it is the forced first real token (include_first; it joins every head, exempt from
    heads_per_token); a head keeps at most `capacity` tokens per sequence, the earliest. Every rule looks at token t
    and the tokens before it only. With packed `documents` (a DocumentLayout) "sequence" means document: each
    document's first token is forced and the capacity holds per document."""
    batch, seq_len, _ = router_logits.shape
    joined, dropped = (t.transpose(1, 2) for t in heads_above_threshold(router_logits, thresholds, heads_per_token))
    if include_first:
        if documents is not None:
            forced = documents.is_first.unsqueeze(1)
        else:
            first = first_real_position(attention_mask, batch, router_logits.device)
            forced = (torch.arange(seq_len, device=joined.device) == first[:, None]).unsqueeze(1)
        joined, dropped = joined | forced, dropped & ~forced
    if attention_mask is not None:
        real = attention_mask.bool().unsqueeze(1)
        joined, dropped = joined & real, dropped & real
    over_capacity = torch.zeros_like(joined)
    if capacity is not None:
        count = joined.cumsum(-1)
        if documents is not None:  # joins so far in the token's own document: less those before it began
            before = torch.nn.functional.pad(count, (1, 0))[..., :-1]
            count = count - before.gather(-1, documents.starts[:, None, :].expand_as(count))
        kept = joined & (count <= capacity)
        joined, over_capacity = kept, joined & ~kept
    return joined, {"heads_per_token": dropped.sum(), "capacity": over_capacity.sum()}


class RecordedSelection(NamedTuple):
    """A forward's routing, kept for inspection (router health, `mosa inspect`): indices [B, E, K] sorted by
    position, scores [B, E, K] (0 marks an empty slot: padding, or a causal head's unused width), the input's
    seq_len and attention_mask [B, T] or None, the routing rule ("topk" | "causal") and K_target, the selection size
    top-k would use at this seq_len (what causal routing is calibrated to keep)."""

    indices: torch.Tensor
    scores: torch.Tensor
    seq_len: int
    attention_mask: torch.Tensor | None
    routing: str
    target_size: int


def threshold_targets(router_logits: torch.Tensor, keep: list[int], include_first: bool, attention_mask=None):
    """Per head, the threshold that would have kept keep[b] tokens of sequence b: router_logits [B, T, E] ->
    (sums [E], rows [E]): the sum over rows of the midpoint between the row's n-th and (n+1)-th largest candidate
    logit, n = keep less the forced first token, and the number of rows summed. Candidates are the real tokens, less
    the first one under include_first (it joins anyway). The midpoint, not the n-th logit itself, because a token
    joins iff its logit is strictly above the threshold: at the midpoint exactly n pass. Rows with no candidate to
    drop (short rows) are left out. Sums, not means, so ranks can add theirs before dividing."""
    batch, seq_len, num_heads = router_logits.shape
    if seq_len < 2:  # one token: nothing to rank
        return router_logits.new_zeros(num_heads), router_logits.new_zeros(num_heads)
    logits = router_logits.detach().transpose(1, 2)  # [B, E, T]
    candidates = (torch.ones(batch, seq_len, dtype=torch.bool, device=logits.device) if attention_mask is None
                  else attention_mask.bool().clone())
    if include_first:
        first = first_real_position(attention_mask, batch, logits.device)
        candidates[torch.arange(batch, device=logits.device), first] = False
    picks = torch.tensor(keep, device=logits.device) - int(include_first)  # [B]
    usable = (picks >= 1) & (picks < candidates.sum(-1))
    width = min(seq_len, max(keep) + 1)
    ordered = logits.masked_fill(~candidates[:, None], float("-inf")).topk(width, dim=-1).values  # [B, E, width]
    index = picks.clamp(1, width - 1)[:, None, None].expand(-1, num_heads, 1)
    midpoint = ((ordered.gather(-1, index - 1) + ordered.gather(-1, index)) / 2)[..., 0]  # [B, E]
    midpoint = torch.where(usable[:, None], midpoint, torch.zeros_like(midpoint))
    return midpoint.sum(0), usable.sum().to(midpoint.dtype).expand(num_heads)


class MoSAAttention(SparseHeads):
    """`num_heads` MoSA heads, summed. Exactly one of `sparsity` (k = max(2, T // sparsity)) or a fixed `k`.

    Parameters (the public reference code's layout): router.weight [E, h], w_qkv [E, h, 3*head_dim] (Q|K|V),
    w_o [E, head_dim, h]; buffer causal_threshold [E] (router-logit thresholds of causal routing).
    forward(x [B, T, h], attention_mask [B, T] or None, routing="topk"|"causal") -> [B, T, h].
    With `router_aux_loss = True`, each top-k forward leaves `last_router_aux_loss`: the binary cross-entropy of
    the router logits against top-k membership, for the model to add to its loss.

    Causal limits (`set_causal_limits`), None = unlimited: `capacity`, the most tokens a head keeps per sequence
    (its KV-cache slots; the causal forward then runs at that width instead of T), and `heads_per_token`, the most
    heads one token joins (decode computes that many heads per token). Joins beyond them are dropped the same way
    in the causal forward, prefill and decode, and counted: `last_causal_overflow` after a causal forward, the
    cache's counters during generation.

    With `record_selection = True`, each forward keeps its routing, detached, in `last_selection`
    (a RecordedSelection); off by default, so the training step pays nothing for it.
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
        super().__init__(hidden_size, num_heads, head_dim, rotate_fraction, rope_base)
        if (sparsity is None) == (k is None):
            raise ValueError(f"give exactly one of sparsity or k, got sparsity={sparsity!r}, k={k!r}")
        if sparsity is not None:
            check_positive_int("sparsity", sparsity)
        if k is not None:
            check_positive_int("k", k, minimum=2 if include_first else 1)
        self.sparsity, self.k, self.include_first = sparsity, k, include_first
        self.router = nn.Linear(hidden_size, num_heads, bias=False)
        self.register_buffer("causal_threshold", torch.zeros(num_heads))
        self.capacity = self.heads_per_token = None
        self.threshold_momentum = None  # causal training: see set_threshold_momentum
        self.threshold_warm = False
        self.last_causal_joins = None
        self.router_aux_loss = False
        self.last_router_aux_loss = None
        self.record_selection = False
        self.last_selection = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        self.reset_head_parameters()

    def set_causal_limits(self, capacity: int | None = None, heads_per_token: int | None = None) -> None:
        """See the class docstring; None lifts a limit."""
        if capacity is not None:
            check_positive_int("capacity", capacity)
        if heads_per_token is not None:
            check_positive_int("heads_per_token", heads_per_token)
        self.capacity, self.heads_per_token = capacity, heads_per_token

    def set_threshold_momentum(self, momentum: float | None, warm: bool = False) -> None:
        """Causal training: with a momentum m in [0, 1), every training forward under causal routing (grad enabled)
        moves `causal_threshold` to m * threshold + (1 - m) * target, target = the threshold that would have kept
        top-k's count of each sequence of the batch (`threshold_targets`, averaged over rows and ranks). The first
        update copies the target (a warm start: from 0 an EMA at m = 0.99 would need hundreds of steps to reach the
        logits' scale); `warm=True` says the thresholds are already meaningful (a resumed run) and skips it.
        None turns the update off (the default; eval mode and no_grad never update)."""
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be a number in [0, 1) or None, got momentum={momentum!r}")
        self.threshold_momentum, self.threshold_warm = momentum, warm

    @torch.no_grad()
    def update_causal_threshold(self, router_logits: torch.Tensor, attention_mask=None, documents=None) -> None:
        """One EMA step of `causal_threshold` toward the batch's targets (see set_threshold_momentum).

        Called only after this batch's routing is decided, so the threshold a batch is routed with never depends on
        that batch (nor on any of its future tokens): the step stays strictly causal. Under torch.distributed the
        targets are summed over ranks first, so every rank moves its thresholds identically. With packed
        `documents` every document counts as a row of its own, keeping its k_d."""
        if documents is not None:
            router_logits, attention_mask = documents.unpack(router_logits)
        seq_len = router_logits.shape[1]
        if attention_mask is None:
            keep = [self.selection_size(seq_len)] * router_logits.shape[0]
        else:  # each row keeps what top-k keeps of its real length
            keep = [min(self.k, n) if self.k is not None else self.selection_size(max(n, 1))
                    for n in attention_mask.sum(-1).tolist()]
        sums, rows = threshold_targets(router_logits.float(), keep, self.include_first, attention_mask)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            totals = torch.cat([sums, rows])
            torch.distributed.all_reduce(totals)
            sums, rows = totals.split(self.num_heads)
        target = (sums / rows.clamp(min=1)).to(self.causal_threshold.dtype)
        momentum = self.threshold_momentum if self.threshold_warm else 0.0
        moved = momentum * self.causal_threshold + (1.0 - momentum) * target
        # a batch without a usable row (every row too short) leaves the thresholds as they are
        self.causal_threshold.copy_(torch.where(rows > 0, moved, self.causal_threshold))
        self.threshold_warm = True

    def selection_size(self, seq_len: int) -> int:
        return selection_size(seq_len, self.sparsity, self.k)

    def select(self, x: torch.Tensor, attention_mask=None, routing: str = "topk", documents=None):
        """Route: x [B, T, h] -> indices [B, E, K] (sorted by position), scores [B, E, K]. At T = 1 include_first
        and top-k both pick the only token, so short inputs need no rule of their own. With packed `documents`
        (a DocumentLayout) every document routes on its own, as if it were alone."""
        if check_routing(routing) == "causal":
            logits = self.router(x)
            joined, scores = self.route_logits(logits, attention_mask, documents)
            if self.threshold_momentum is not None and self.training and torch.is_grad_enabled():
                self.update_causal_threshold(logits, attention_mask, documents)  # after routing: see its docstring
            indices, scores = membership_selection(joined, scores, self.causal_width(x.shape[1], documents))
        else:
            logits = router_logits(x, self.router.weight)
            if documents is None:
                indices, scores = topk_route(logits, self.selection_size(x.shape[1]), self.include_first,
                                             attention_mask)
            else:
                indices, scores = topk_route_documents(logits, documents, self.sparsity, self.k, self.include_first)
            if self.router_aux_loss and torch.is_grad_enabled():
                self.last_router_aux_loss = router_membership_loss(self.router(x), indices, scores, attention_mask)
        if self.record_selection:
            target = (self.selection_size(x.shape[1]) if documents is None
                      else documents.selection_sizes(self.sparsity, self.k)[1])
            self.last_selection = RecordedSelection(indices.detach(), scores.detach(), x.shape[1], attention_mask,
                                                    routing, target)
        return indices, scores

    def scores_router_weight(self) -> torch.Tensor:
        """Scores are sigmoid(x . router.weight[e]): the op takes the router's gradient from the selected rows."""
        return self.router.weight

    def causal_route(self, x: torch.Tensor, attention_mask=None):
        """Causal routing of every token on its own: x [B, T, h] -> joined [B, E, T] bool, scores [B, E, T]
        (sigmoid router score, 0 where not joined). Sets `last_causal_overflow`."""
        return self.route_logits(self.router(x), attention_mask)

    def route_logits(self, logits: torch.Tensor, attention_mask=None, documents=None):
        """causal_route from router logits [B, T, E]; also sets `last_causal_joins` (kept joins, a 0-dim tensor)."""
        joined, self.last_causal_overflow = causal_membership(
            logits, self.causal_threshold, self.include_first, attention_mask, self.heads_per_token, self.capacity,
            documents)
        self.last_causal_joins = joined.sum()
        return joined, torch.sigmoid(logits).transpose(1, 2) * joined

    def document_selections(self) -> list[tuple[int | None, int | None]]:
        """The (sparsity, k) keys this layer reads from a DocumentLayout (see DocumentLayout.prepare)."""
        return [(self.sparsity, self.k)] + ([(None, self.capacity)] if self.capacity is not None else [])

    def causal_width(self, seq_len: int, documents=None) -> int:
        """Selection width of the causal forward: the capacity when set (fixed by the configuration, not by the
        tokens, so the forward stays causal bit for bit), else T. Packed documents each keep up to the capacity:
        the width is the largest sum of min(len_d, capacity) over a row (set by the layout, not the tokens)."""
        if self.capacity is None:
            return seq_len
        if documents is not None:
            return documents.selection_sizes(None, self.capacity)[1]
        return min(seq_len, self.capacity)

    def cache_capacity(self, max_len: int) -> int:
        return self.causal_width(max_len)

    def route_token(self, x: torch.Tensor, position: torch.Tensor, cache):
        """x [B, h] -> heads [B, J] (None: all E heads, when heads_per_token is unset), joined [B, J], scores [B, J].
        Heads dropped by heads_per_token are added to the cache's overflow count."""
        logits = self.router(x)
        if self.heads_per_token is None or self.heads_per_token >= self.num_heads:
            return None, logits.detach() > self.causal_threshold, torch.sigmoid(logits)
        return route_heads(logits, self.causal_threshold, cache.token_overflow, self.heads_per_token)

    def decode_inputs(self, x: torch.Tensor, cache):
        """The new token x [B, 1, h] -> (x [B, h] in the weights' compute dtype, MoSADecodeInputs): the router,
        thresholds, limit, weights and cache for ops.decode.layer_decode, which routes as route_token does."""
        hx, w_qkv, w_o = self._weights(x[:, 0])
        return hx, MoSADecodeInputs(self.router.weight.to(hx.dtype), self.causal_threshold, self.heads_per_token,
                                    w_qkv, w_o, cache.k, cache.v, cache.counts, cache.capacity_overflow,
                                    cache.token_overflow)

    def forward(self, x: torch.Tensor, attention_mask=None, routing: str = "topk", documents=None) -> torch.Tensor:
        check_attention_input(x, self.hidden_size, self.w_qkv, attention_mask, documents)
        return self.attend(x, *self.select(x, attention_mask, routing, documents), documents)

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
