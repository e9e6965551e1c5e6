"""Validation loss, perplexity and (for byte tokenizers) bits per byte over a token split."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tqdm.auto import tqdm

from torch_mosa.data.shards import TokenDataset, iter_eval_batches
from torch_mosa.ops.documents import document_ids_from_separators


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TokenDataset, batch_size: int, seq_len: int,
             max_batches: int | None = None, device: torch.device | str = "cpu", *, rank: int = 0,
             world_size: int = 1, drop_last: bool = False, autocast_dtype: torch.dtype | None = None,
             progress: bool = False, pack_documents: bool = False, per_window: bool = False,
             **forward_kwargs) -> dict:
    """Token-mean next-token loss over the split's non-overlapping windows (see `iter_eval_batches`).

    Returns {loss, ppl, tokens, windows, split_windows} plus `bpb` for byte-level data, and under routing="causal"
    the MoSA layers' `causal_join_rate` and `causal_overflow_rate` (see torch_mosa.train.causal; a capacity overflow
    is reported, never silent): `windows` of the split's `split_windows` windows of seq_len tokens were read (fewer
    when max_batches stops early). ppl = exp(loss) with the loss averaged over tokens, not over batches. Every extra
    keyword argument goes to `model(...)` (e.g. routing="causal").
    With world_size > 1 each rank evaluates its share and the sums are all-reduced; drop_last gives every rank
    the same number of batches, which FSDP needs since every forward is a collective. pack_documents: keep the
    documents of each window apart (`document_ids` split at the end-of-text token, as training with it does).
    per_window (one process only): also `window_losses`, each window's mean loss in nats per token, in split order
    (window i starts at token i * seq_len), for per-document reports and paired comparisons.
    """
    if per_window and world_size > 1:
        raise ValueError("per_window=True needs one process (world_size=1): the windows are not gathered")
    was_training = model.training
    model.eval()
    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    # [sum of losses in nats, number of target tokens, number of target bytes,
    #  causal routing: (token, head) joins wanted, joins dropped by the causal limits, (token, head) slots]
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    window_losses = []
    split_windows = (dataset.num_tokens - 1) // seq_len
    num_batches = math.ceil(split_windows / (batch_size * world_size))
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    windows = min(split_windows, num_batches * batch_size * world_size)
    batches = iter_eval_batches(dataset, batch_size, seq_len, max_batches, rank=rank, world_size=world_size,
                                drop_last=drop_last, device=device)
    for x, y in tqdm(batches, total=num_batches, unit="batch", disable=not progress, leave=False,
                     desc=f"eval {dataset.split}: {windows:,} of {split_windows:,} windows of {seq_len} tokens"):
        packed = {"document_ids": document_ids_from_separators(x, dataset.eot_id)} if pack_documents else {}
        with autocast:
            logits, _ = model(x, **forward_kwargs, **packed)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        if per_window:
            window_losses += losses.view(y.shape).double().mean(1).tolist()
        totals[0] += losses.sum(dtype=torch.float64)
        totals[1] += y.numel()
        totals[2] += (y != dataset.eot_id).sum()
        stats = getattr(model, "last_causal_stats", None) if forward_kwargs.get("routing") == "causal" else None
        if stats is not None:
            overflow = stats["capacity_overflow"] + stats["heads_per_token_overflow"]
            totals[3:] += torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                                       for v in (stats["joined"] + overflow, overflow, stats["slots"])])
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    total_loss, num_tokens, num_bytes, wanted, overflow, slots = totals.tolist()
    if num_tokens == 0:
        raise ValueError(f"evaluation saw no tokens: the {dataset.split!r} split holds {dataset.num_tokens} tokens, "
                         f"too few for seq_len={seq_len}")
    loss = total_loss / num_tokens
    result = {"loss": loss, "ppl": math.exp(loss), "tokens": int(num_tokens), "windows": windows,
              "split_windows": split_windows}
    if slots:
        result.update(causal_join_rate=wanted / slots, causal_overflow_rate=overflow / slots)
    if per_window:
        result["window_losses"] = window_losses
    if dataset.meta.get("tokenizer") == "byte":
        # Bits per byte: the whole loss (end-of-text predictions included) over the bytes of text predicted.
        result["bpb"] = total_loss / math.log(2) / max(num_bytes, 1)
    return result
