"""Calibrate the causal-routing thresholds of a trained model so each MoSA head keeps about T/sparsity tokens.

Layer by layer, in order: the router logits of layer l depend on the layers below it, which already run with
their calibrated causal routing, so every threshold is set on the inputs it will see at inference.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from torch_mosa.layers.mosa import MoSAAttention


def uncalibrated(model) -> bool:
    """True when causal routing would use thresholds never set: all 0 in some layer of a model whose router was not
    trained to predict membership (router_aux_loss_weight 0). Such a router keeps far more than T/sparsity tokens."""
    return model.config.router_aux_loss_weight == 0 and any(
        not layer.causal_threshold.any() for layer in model.mosa_layers)


@torch.no_grad()
def calibrate_causal_thresholds(model, batches, *, progress: bool = False) -> list[dict]:
    """Set every MoSA layer's `causal_threshold` [E] so each head keeps the tokens top-k would keep.

    batches: an iterable of input_ids [B, T], or of (input_ids, attention_mask [B, T]) pairs for padded batches
    (materialised once: every layer makes a pass over them). Only real tokens count; with include_first each row's
    first real token (always kept) is left out. A row of n real tokens should keep selection_size(n) of them, so the
    threshold keeps that many over all rows; where tied logits (common in bf16) straddle the threshold it keeps all
    or none of the ties, whichever lands closer to the target.
    Returns per layer {"layer", "threshold_mean", "kept_fraction", "target_fraction"} over the candidate tokens.
    progress: a progress bar over the forwards (one per batch and MoSA layer).
    """
    batches = [b if isinstance(b, (tuple, list)) else (b, None) for b in batches]
    if not batches:
        raise ValueError("calibrate_causal_thresholds needs at least one batch of input_ids")
    was_training = model.training
    model.eval()
    report = []
    bar = tqdm(total=len(model.mosa_layers) * len(batches), unit="batch", disable=not progress, leave=False,
               desc="calibrate (a pass per MoSA layer)")
    try:
        # model.mosa_layers: the routed MoSA layers, bottom to top (fixed heads route by position, need nothing)
        for index, layer in enumerate(model.mosa_layers):
            flat, num_keep = _candidate_logits(model, layer, batches, bar)  # [N, E], the number of them top-k keeps
            layer.causal_threshold.copy_(_keep_threshold(flat.to(layer.causal_threshold.dtype), num_keep))
            kept = (flat > layer.causal_threshold).float().mean().item() if len(flat) else 0.0
            report.append({"layer": index, "threshold_mean": layer.causal_threshold.float().mean().item(),
                           "kept_fraction": kept, "target_fraction": num_keep / max(1, len(flat))})
    finally:
        bar.close()
        model.train(was_training)
    return report


def spread_windows(dataset, count: int, seq_len: int) -> torch.Tensor:
    """`count` windows [count, seq_len] (int64) of a token split (a `TokenDataset`), their starts spread evenly over
    it: the first windows would all come from one document."""
    if dataset.num_tokens < seq_len:
        raise ValueError(f"the {dataset.split} split holds {dataset.num_tokens} tokens, fewer than seq_len={seq_len}")
    starts = np.linspace(0, dataset.num_tokens - seq_len, count).astype(np.int64)
    return torch.from_numpy(np.stack([dataset.window(int(start), seq_len) for start in starts]).astype(np.int64))


def calibrate_on_dataset(model, dataset, batch_size: int, seq_len: int, num_batches: int,
                         device: torch.device | str = "cpu", *, progress: bool = False) -> list[dict]:
    """calibrate_causal_thresholds on `num_batches` x `batch_size` windows of seq_len tokens spread over a token
    split (a `TokenDataset`, e.g. the training split of a run's data: `torch_mosa.runs.training_data_dir`)."""
    windows = spread_windows(dataset, num_batches * batch_size, seq_len)
    return calibrate_causal_thresholds(model, windows.to(device).split(batch_size), progress=progress)


def _keep_threshold(flat: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Per column of flat [N, E], a threshold that `num_keep` entries exceed (strictly), in flat's dtype.

    With ties at the boundary it keeps them all or none, whichever is closer to num_keep. The threshold lies midway
    between the smallest kept and the largest dropped value (where the dtype has a number between them), so a logit
    recomputed in another shape (decode's one-token matmul) that moves by an ulp stays on its side."""
    num = flat.shape[0]
    if num_keep >= num:
        return torch.full((flat.shape[1],), float("-inf"), dtype=flat.dtype, device=flat.device)
    ordered = flat.sort(dim=0, descending=True).values
    if num_keep == 0:
        return ordered[0]
    boundary = ordered[num_keep - 1]
    above = (flat > boundary).sum(0)
    at_or_above = (flat >= boundary).sum(0)
    kept = torch.where(at_or_above - num_keep <= num_keep - above, at_or_above, above)  # [E]
    smallest_kept = ordered.gather(0, (kept - 1).clamp(min=0)[None])[0]
    largest_dropped = ordered.gather(0, kept.clamp(max=num - 1)[None])[0]
    middle = ((smallest_kept.double() + largest_dropped.double()) / 2).to(flat.dtype)
    threshold = torch.where((middle > largest_dropped) & (middle < smallest_kept), middle, largest_dropped)
    threshold = torch.where(kept == 0, ordered[0], threshold)
    return torch.where(kept == num, torch.full_like(threshold, float("-inf")), threshold)


def _candidate_logits(model, layer: MoSAAttention, batches, bar: tqdm):
    """Router logits of every candidate token (real, and not the forced first one) -> ([N, E], tokens to keep)."""
    captured, rows, num_keep = [], [], 0
    handle = layer.router.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
    try:
        for input_ids, attention_mask in batches:
            model(input_ids, attention_mask=attention_mask, routing="causal")
            real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            candidates = real.clone()
            if layer.include_first:
                first = real.long().argmax(dim=1)
                candidates[torch.arange(len(real), device=real.device), first] = False
            for length in real.sum(dim=1).tolist():
                if length:
                    k = layer.k if layer.k is not None else layer.selection_size(length)
                    num_keep += min(k, length) - (1 if layer.include_first else 0)
            rows.append(captured.pop()[candidates])
            bar.update()
    finally:
        handle.remove()
    flat = torch.cat(rows)
    return flat, min(num_keep, len(flat))
