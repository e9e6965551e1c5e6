"""Validation loss, perplexity and (for byte tokenizers) bits per byte over a token split."""

from __future__ import annotations

import contextlib
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from torch_mosa.data.shards import TokenDataset, is_shard_dir, iter_eval_batches, prepare_corpus
from torch_mosa.inference.calibrate import calibrate_causal_thresholds, uncalibrated
from torch_mosa.train.checkpoint import load_model, read_config, resolve_checkpoint
from torch_mosa.train.data import DATA_DIR


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TokenDataset, batch_size: int, seq_len: int,
             max_batches: int | None = None, device: torch.device | str = "cpu", *, rank: int = 0,
             world_size: int = 1, drop_last: bool = False, autocast_dtype: torch.dtype | None = None,
             **forward_kwargs) -> dict:
    """Token-mean next-token loss over the split's non-overlapping windows (see `iter_eval_batches`).

    Returns {loss, ppl, tokens} plus `bpb` for byte-level data. ppl = exp(loss) with the loss averaged over
    tokens, not over batches. Every extra keyword argument goes to `model(...)` (e.g. routing="causal").
    With world_size > 1 each rank evaluates its share and the sums are all-reduced; drop_last gives every rank
    the same number of batches, which FSDP needs since every forward is a collective.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    # [sum of losses in nats, number of target tokens, number of target bytes]
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in iter_eval_batches(dataset, batch_size, seq_len, max_batches, rank=rank, world_size=world_size,
                                  drop_last=drop_last, device=device):
        with autocast:
            logits, _ = model(x, **forward_kwargs)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        totals[0] += losses.sum(dtype=torch.float64)
        totals[1] += y.numel()
        totals[2] += (y != dataset.eot_id).sum()
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    total_loss, num_tokens, num_bytes = totals.tolist()
    if num_tokens == 0:
        raise ValueError(f"evaluation saw no tokens: the {dataset.split!r} split holds {dataset.num_tokens} tokens, "
                         f"too few for seq_len={seq_len}")
    loss = total_loss / num_tokens
    result = {"loss": loss, "ppl": math.exp(loss), "tokens": int(num_tokens)}
    if dataset.meta.get("tokenizer") == "byte":
        # Bits per byte: the whole loss (end-of-text predictions included) over the bytes of text predicted.
        result["bpb"] = total_loss / math.log(2) / max(num_bytes, 1)
    return result


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, *, split: str = "val", batch_size: int = 8,
                        seq_len: int | None = None, max_batches: int | None = None,
                        device: torch.device | str = "cpu", progress: bool = False, routing: str = "topk",
                        calibrate_batches: int = 0, decode_tokens: int = 0) -> dict:
    """Evaluate a checkpoint (or a run directory's latest) on `split` of `data`.

    data: None (the run's own training data), a prepared shard directory (its tokenizer must be the model's), or
    raw text, tokenized here with the run's tokenizer and evaluated whole (the `split` is then ignored).
    seq_len defaults to the model's max_seq_len. routing: "topk" (the paper's, non-causal) or "causal"; with
    "causal" the KV-cache footprint of one batch is measured too (kv_pairs_per_token, kv_bytes_per_token), and
    calibrate_batches > 0 first calibrates the causal thresholds on that many batches of the training split
    (otherwise the checkpoint's thresholds are used), and decode_tokens > 0 times greedy decoding of that many
    tokens for one sequence after a prompt of half a window (decode_tokens_per_s).
    Returns evaluate()'s dict plus checkpoint, data, split, routing.
    """
    path = resolve_checkpoint(checkpoint)
    model, config = load_model(path, device)
    seq_len = seq_len or config.max_seq_len
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={config.max_seq_len}")
    # bf16 autocast on CUDA, as training runs there; fp32 elsewhere
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        return _evaluate_loaded(model, config, path, data, split, batch_size, seq_len, max_batches, device, progress,
                                routing, calibrate_batches, decode_tokens)


def _evaluate_loaded(model, config, path, data, split, batch_size, seq_len, max_batches, device, progress, routing,
                     calibrate_batches, decode_tokens) -> dict:
    if calibrate_batches and routing == "causal":
        calibrate_on_training_data(model, path, batch_size, seq_len, calibrate_batches, device)
    elif routing == "causal" and uncalibrated(model):
        warnings.warn(f"{path} has uncalibrated causal-routing thresholds (all 0): pass calibrate_batches "
                      "(`--calibrate-batches`) or run `mosa calibrate` first", stacklevel=2)
    with tempfile.TemporaryDirectory(prefix="mosa-eval-") as scratch:
        if data is None:
            data_dir = training_data_dir(path)
        elif is_shard_dir(data):
            data_dir = Path(data)
        else:
            data_dir, split = Path(scratch), "train"
            prepare_corpus(data, data_dir, tokenizer=str(training_data_dir(path)), val_fraction=0.0, progress=progress)
        dataset = TokenDataset(data_dir, split)
        if dataset.vocab_size != config.vocab_size:
            raise ValueError(f"data {str(data_dir)!r} has vocab_size={dataset.vocab_size} but the model of {path} has "
                             f"{config.vocab_size}: evaluate on data tokenized with the model's tokenizer")
        result = evaluate(model, dataset, batch_size, seq_len, max_batches, device, routing=routing)
        if routing == "causal":
            from torch_mosa.inference.report import kv_cache_footprint

            x, _ = next(iter_eval_batches(dataset, batch_size, seq_len, 1, device=device))
            footprint = kv_cache_footprint(model, x)
            result.update(kv_pairs_per_token=footprint["pairs_per_token"],
                          kv_pairs_per_sequence=footprint["pairs_per_sequence"],
                          kv_bytes_per_token=footprint["bytes_per_token"])
            if decode_tokens:
                from torch_mosa.inference.report import decode_tokens_per_second

                prompt = x[:1, : max(1, min(seq_len // 2, config.max_seq_len - decode_tokens - 4))]
                result["decode_tokens_per_s"] = decode_tokens_per_second(model, prompt, decode_tokens)
    return {**result, "checkpoint": str(path), "data": str(data or data_dir), "split": split, "routing": routing}


def calibrate_on_training_data(model, checkpoint: Path, batch_size: int, seq_len: int, num_batches: int,
                               device) -> list[dict]:
    """Calibrate the causal-routing thresholds on `num_batches` x `batch_size` windows of the run's training split,
    spread evenly over it (the first windows would all come from one document)."""
    train = TokenDataset(training_data_dir(checkpoint), "train")
    if train.num_tokens < seq_len:
        raise ValueError(f"the training split holds {train.num_tokens} tokens, fewer than seq_len={seq_len}")
    starts = np.linspace(0, train.num_tokens - seq_len, num_batches * batch_size).astype(np.int64)
    windows = torch.from_numpy(np.stack([train.window(int(s), seq_len) for s in starts]).astype(np.int64))
    return calibrate_causal_thresholds(model, windows.to(device).split(batch_size))


def training_data_dir(checkpoint: Path) -> Path:
    """The shard directory (with its tokenizer) that the run of `checkpoint` trained on."""
    spec = read_config(checkpoint).get("train", {}).get("data")
    if spec is not None and is_shard_dir(spec):
        return Path(spec)
    run_dir = checkpoint.parent.parent  # <run>/checkpoints/step_*
    if not is_shard_dir(run_dir / DATA_DIR):
        raise ValueError(f"the training data of {checkpoint} is not at {run_dir / DATA_DIR}; pass --data")
    return run_dir / DATA_DIR
