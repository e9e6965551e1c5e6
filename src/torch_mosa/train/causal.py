"""Causal training (issue 11): train with the routing that generation uses, so both see the same selections.

Every MoSA layer routes each token by its per-head threshold (`routing="causal"`), the thresholds follow the router
(an EMA of the batch's top-k threshold, `MoSAAttention.set_threshold_momentum`), and each head keeps at most
`capacity` tokens per sequence, so the causal forward runs at that width and its FLOPs stay bounded. Joins a limit
drops are counted and logged, never silent.
"""

from __future__ import annotations

import math

import torch

from torch_mosa.inference.limits import set_causal_limits
from torch_mosa.train.distributed import DistInfo, all_reduce_mean


def causal_capacity(model, seq_len: int, capacity_factor: float | None) -> int | None:
    """Tokens a MoSA head keeps per sequence of seq_len: ceil(capacity_factor x k), k = top-k's count, at most
    seq_len; None without a factor (or without MoSA layers)."""
    if capacity_factor is None or not model.mosa_layers:
        return None
    return min(seq_len, math.ceil(capacity_factor * model.mosa_layers[0].selection_size(seq_len)))


def setup_causal_training(model, seq_len: int, capacity_factor: float | None, momentum: float,
                          resumed: bool) -> "CausalRoutingMeter":
    """Set the capacity and the threshold momentum on every MoSA layer of `model`; returns the meter of join and
    overflow rates. A resumed run whose checkpoint holds thresholds continues their EMA instead of warm-starting
    it from its first batch."""
    capacity = causal_capacity(model, seq_len, capacity_factor)
    set_causal_limits(model, capacity=capacity)
    warm = resumed and any(bool(layer.causal_threshold.any()) for layer in model.mosa_layers)
    for layer in model.mosa_layers:
        layer.set_threshold_momentum(momentum, warm=warm)
    return CausalRoutingMeter(model, seq_len, capacity)


class CausalRoutingMeter:
    """Sums the model's `last_causal_stats` over training forwards (add after each), and turns them into rates:
    `causal_join_rate`, the share of (token, head) slots whose logit passed the threshold (joins kept plus joins the
    limits dropped; the EMA steers it toward `target_rate` = k / T), and `causal_overflow_rate`, the share dropped by
    capacity or heads_per_token. `rates()` covers the forwards since its last call, `run_rates()` all of this
    session's (a resumed run counts from its resume); both are means over ranks (a collective: call them on every
    rank)."""

    def __init__(self, model, seq_len: int, capacity: int | None):
        self.model = model
        self.capacity = capacity
        self.target_rate = model.mosa_layers[0].selection_size(seq_len) / seq_len if model.mosa_layers else None
        self._interval = self._run = None

    def add(self) -> None:
        stats = self.model.last_causal_stats
        if stats is None:  # no MoSA layers: nothing routes by threshold
            return
        overflow = stats["capacity_overflow"] + stats["heads_per_token_overflow"]
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=overflow.device)
                              for v in (stats["joined"] + overflow, overflow, stats["slots"])])
        self._interval = values if self._interval is None else self._interval + values
        self._run = values if self._run is None else self._run + values

    def rates(self, info: DistInfo) -> dict:
        totals, self._interval = self._interval, None
        return self._rates(totals, info)

    def run_rates(self, info: DistInfo) -> dict:
        return {"causal_target_rate": self.target_rate, "causal_capacity": self.capacity,
                **self._rates(self._run, info)}

    @staticmethod
    def _rates(totals, info: DistInfo) -> dict:
        if totals is None:
            return {}
        wanted, overflow, slots = all_reduce_mean(totals, info).tolist()
        return {"causal_join_rate": wanted / slots, "causal_overflow_rate": overflow / slots}
