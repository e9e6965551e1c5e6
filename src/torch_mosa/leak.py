"""The future leak of top-k routing, measured directly (issue 15, item 4).

The paper's expert-choice routing picks each head's top-k tokens over the whole window, so whether token t is
picked, and so every output at t, depends on tokens after t: a language model trained that way can lower its loss
with information from the future. Causal routing and dense attention cannot. This module measures the leak:

  future_leak      for windows of the evaluation split, replace everything from a cut point on (with text of another
                   document, or of the same document far away) and report how the loss on the tokens before the cut
                   changes: per-window mean change, its bootstrap 95% interval, the mean absolute change and the
                   share of windows that moved at all. A model without a leak gives exactly 0 on a deterministic
                   device; the run-to-run difference of the same windows (`noise`, from fp32 atomics in the fused
                   kernels on a GPU) is reported beside it as the floor.
  loss_by_position the mean loss at each position of the window, e.g. to plot top-k minus causal loss by position.

The loss before the cut counts positions 0 .. cut - 2: position cut - 1 predicts the first replaced token.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from torch_mosa.checks import check_positive_int, check_routing
from torch_mosa.data.shards import TokenDataset
from torch_mosa.statistics import bootstrap_interval

REPLACEMENTS = ("other", "far")
# "far": the replacement starts at least this many windows away from the window, inside the same document
FAR_WINDOWS = 8


def spread_window_starts(dataset: TokenDataset, seq_len: int, num_windows: int) -> np.ndarray:
    """Starts of up to `num_windows` windows of seq_len + 1 tokens spread evenly over the split (distinct)."""
    check_positive_int("num_windows", num_windows)
    last_start = dataset.num_tokens - seq_len - 1
    if last_start < 0:
        raise ValueError(f"the {dataset.split!r} split holds {dataset.num_tokens} tokens, fewer than a window of "
                         f"seq_len + 1 = {seq_len + 1}")
    return np.unique(np.linspace(0, last_start, num_windows).astype(np.int64))


def leak_windows(dataset: TokenDataset, seq_len: int, cut: int, num_windows: int, replacement: str):
    """(starts [N], sources [N]): windows of seq_len + 1 tokens spread evenly over the split, and where each one's
    replacement future (seq_len - cut tokens) comes from: another document ("other"), or the same document at
    least FAR_WINDOWS windows away ("far"). Windows without such a source are left out, so N <= num_windows."""
    if replacement not in REPLACEMENTS:
        raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {replacement!r}")
    if not 1 <= cut < seq_len:
        raise ValueError(f"cut must be in [1, seq_len={seq_len}), got cut={cut}")
    starts = spread_window_starts(dataset, seq_len, num_windows)
    ends = dataset.end_of_text_positions()
    future = seq_len - cut
    chosen, sources = [], []
    for i, start in enumerate(starts):
        first_doc, last_doc = np.searchsorted(ends, [start, start + seq_len])
        if replacement == "other":  # the nearest window half the split away whose tokens share no document
            for step in range(len(starts)):
                other = starts[(i + len(starts) // 2 + step) % len(starts)]
                lo, hi = np.searchsorted(ends, [other, other + future])
                if hi < first_doc or lo > last_doc:
                    chosen.append(start)
                    sources.append(other)
                    break
        else:  # the same document, at least FAR_WINDOWS windows before or after, wholly inside it
            doc = np.searchsorted(ends, start + cut)
            doc_start = 0 if doc == 0 else int(ends[doc - 1]) + 1
            doc_end = int(ends[doc]) if doc < len(ends) else dataset.num_tokens  # exclusive of the end token
            gap = FAR_WINDOWS * (seq_len + 1)
            for source in (start + gap, start - gap - future):
                if doc_start <= source and source + future <= doc_end:
                    chosen.append(start)
                    sources.append(source)
                    break
    return np.asarray(chosen, dtype=np.int64), np.asarray(sources, dtype=np.int64)


def _window_losses(model, inputs: torch.Tensor, targets: torch.Tensor, routing: str, batch_size: int) -> torch.Tensor:
    """Per-position next-token losses [N, T] in float64, batch by batch."""
    losses = []
    for i in range(0, len(inputs), batch_size):
        logits, _ = model(inputs[i:i + batch_size], routing=routing)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), targets[i:i + batch_size].flatten(),
                                      reduction="none").view(logits.shape[:2]).double())
    return torch.cat(losses)


@torch.no_grad()
def future_leak(model, dataset: TokenDataset, seq_len: int, cut: int, num_windows: int = 64,
                replacement: str = "other", routing: str = "topk", batch_size: int = 8, device="cpu") -> dict:
    """How much the loss before `cut` changes when the window's future is replaced (see the module docstring).

    Returns {windows, cut, replacement, routing, loss_before_cut, mean_change, interval (low, high), mean_abs_change,
    changed_share, noise}: changes are loss(replaced) - loss(original) in nats per token, averaged over positions
    0 .. cut - 2 of a window, then over windows (interval: bootstrap 95% over windows); noise is the same statistic
    (mean absolute) between two runs of the original windows."""
    check_routing(routing)
    check_positive_int("batch_size", batch_size)
    if cut < 2:
        raise ValueError(f"cut must be at least 2 (position 0 then predicts token 1 before the cut), got cut={cut}")
    starts, sources = leak_windows(dataset, seq_len, cut, num_windows, replacement)
    if len(starts) == 0:
        raise ValueError(f"no window of the {dataset.split!r} split has a {replacement!r} replacement: the split's "
                         "documents are too few or too short for it")
    was_training = model.training
    model.eval()
    tokens = torch.from_numpy(np.stack([dataset.window(int(s), seq_len + 1) for s in starts]).astype(np.int64))
    future = torch.from_numpy(np.stack([dataset.window(int(s), seq_len - cut) for s in sources]).astype(np.int64))
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    replaced = inputs.clone()
    replaced[:, cut:] = future.to(device)
    original = _window_losses(model, inputs, targets, routing, batch_size)[:, :cut - 1]
    again = _window_losses(model, inputs, targets, routing, batch_size)[:, :cut - 1]
    changed = _window_losses(model, replaced, targets, routing, batch_size)[:, :cut - 1]
    model.train(was_training)
    delta = (changed - original).mean(1)
    low, high = bootstrap_interval(delta)
    return {"windows": len(starts), "cut": cut, "seq_len": seq_len, "replacement": replacement, "routing": routing,
            "loss_before_cut": float(original.mean()), "mean_change": float(delta.mean()), "interval": (low, high),
            "mean_abs_change": float(delta.abs().mean()), "changed_share": float((changed != original).any(1)
                                                                                 .double().mean()),
            "noise": float((again - original).mean(1).abs().mean())}


@torch.no_grad()
def loss_by_position(model, dataset: TokenDataset, seq_len: int, num_windows: int = 64, routing: str = "topk",
                     batch_size: int = 8, device="cpu") -> torch.Tensor:
    """Mean next-token loss at each window position [seq_len] (float64, CPU) over windows spread evenly over the
    split."""
    check_routing(routing)
    starts = spread_window_starts(dataset, seq_len, num_windows)
    tokens = torch.from_numpy(np.stack([dataset.window(int(s), seq_len + 1) for s in starts]).astype(np.int64))
    was_training = model.training
    model.eval()
    losses = _window_losses(model, tokens[:, :-1].to(device), tokens[:, 1:].to(device), routing, batch_size)
    model.train(was_training)
    return losses.mean(0).cpu()
