"""Intervals for the study's comparisons: the percentile bootstrap of a mean, and paired per-window differences."""

from __future__ import annotations

import math

import torch


def bootstrap_interval(values, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` [N] (resampled with a fixed seed, so a report is
    reproducible). One value gives (value, value); none gives NaNs."""
    values = torch.as_tensor(values, dtype=torch.float64).cpu()
    if len(values) < 2:
        mean = float(values.mean()) if len(values) else math.nan
        return mean, mean
    generator = torch.Generator().manual_seed(seed)
    means = values[torch.randint(0, len(values), (resamples, len(values)), generator=generator)].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def paired_difference(losses_a, losses_b, resamples: int = 2000, seed: int = 0) -> dict:
    """Model A against model B on the same windows: losses [N] in nats per token, window by window.

    Returns {windows, mean_difference (A - B, nats/token), interval (bootstrap 95% of it), ppl_ratio
    (exp of the mean difference: A's perplexity over B's), ppl_ratio_interval, a_better_share (windows where A's
    loss is lower)}."""
    a = torch.as_tensor(losses_a, dtype=torch.float64)
    b = torch.as_tensor(losses_b, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 1 or len(a) == 0:
        raise ValueError(f"paired losses must be two [N] lists of the same windows, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    difference = a - b
    low, high = bootstrap_interval(difference, resamples, seed)
    mean = float(difference.mean())
    return {"windows": len(a), "mean_difference": mean, "interval": (low, high), "ppl_ratio": math.exp(mean),
            "ppl_ratio_interval": (math.exp(low), math.exp(high)),
            "a_better_share": float((difference < 0).double().mean())}
