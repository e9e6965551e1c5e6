"""Calibrate the causal-routing thresholds of a trained model so each MoSA head keeps about T/sparsity tokens.

Layer by layer, in order: the router logits of layer l depend on the layers below it, which already run with
their calibrated causal routing, so every threshold is set on the inputs it will see at inference.
"""

from __future__ import annotations

import torch

from torch_mosa.layers.mosa import MoSAAttention


def uncalibrated(model) -> bool:
    """True when causal routing would use thresholds never set: all 0 in some layer of a model whose router was not
    trained to predict membership (router_aux_loss_weight 0). Such a router keeps far more than T/sparsity tokens."""
    return model.config.router_aux_loss_weight == 0 and any(
        not layer.causal_threshold.any() for layer in model.mosa_layers)


def _target_rate(layer: MoSAAttention, seq_len: int) -> float:
    """Fraction of tokens a head keeps under top-k; with include_first, of the tokens after the first."""
    k = layer.selection_size(seq_len)
    return (k - 1) / (seq_len - 1) if layer.include_first and seq_len > 1 else k / seq_len


@torch.no_grad()
def calibrate_causal_thresholds(model, batches, attention_mask=None) -> list[dict]:
    """Set every MoSA layer's `causal_threshold` [E] to the router-logit quantile that keeps the top-k rate.

    batches: an iterable of input_ids [B, T] (materialised once: every layer makes a pass over them).
    Returns per layer {"layer", "threshold_mean", "kept_fraction", "target_fraction"} measured after calibration.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate_causal_thresholds needs at least one batch of input_ids")
    was_training = model.training
    model.eval()
    report = []
    try:
        # model.mosa_layers: the routed MoSA layers, bottom to top (fixed heads route by position, need nothing)
        for index, layer in enumerate(model.mosa_layers):
            logits = _collect_router_logits(model, layer, batches, attention_mask)  # [N, T, E]
            seq_len = logits.shape[1]
            rate = _target_rate(layer, seq_len)
            candidates = logits[:, 1:] if layer.include_first else logits
            flat = candidates.reshape(-1, logits.shape[-1]).float()
            layer.causal_threshold.copy_(_keep_threshold(flat, rate))
            kept = (flat > layer.causal_threshold.float()).float().mean().item()
            report.append({"layer": index, "threshold_mean": layer.causal_threshold.float().mean().item(),
                           "kept_fraction": kept, "target_fraction": rate})
    finally:
        model.train(was_training)
    return report


def _keep_threshold(flat: torch.Tensor, rate: float) -> torch.Tensor:
    """Per column of flat [N, E], the value that `rate` of the entries exceed: the (N - n_keep)-th smallest.
    kthvalue has no input-size limit (torch.quantile refuses more than 2**24 elements)."""
    num = flat.shape[0]
    n_keep = min(num, max(1, round(rate * num)))
    if n_keep == num:
        return torch.full((flat.shape[1],), float("-inf"))
    return flat.kthvalue(num - n_keep, dim=0).values


def _collect_router_logits(model, layer: MoSAAttention, batches, attention_mask) -> torch.Tensor:
    captured = []
    handle = layer.router.register_forward_hook(lambda module, args, out: captured.append(out.detach().float()))
    try:
        for input_ids in batches:
            model(input_ids, attention_mask=attention_mask, routing="causal")
    finally:
        handle.remove()
    return torch.cat(captured, dim=0)
