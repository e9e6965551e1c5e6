"""A checkpoint's report, as `mosa eval` prints it: loss, perplexity and bits per byte on the run's data, another
shard directory or raw text, under top-k or causal routing, with causal routing's calibration, KV-cache footprint
and decode speed.

It sits above both `train` (whose `evaluate` computes the loss over a split, as during training) and `inference`
(calibration, the KV-cache and decode reports), and finds the checkpoint, its model, tokenizer and data through
`torch_mosa.runs`, so neither package has to import the other.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from torch_mosa.data.shards import TokenDataset, is_shard_dir, iter_eval_batches, prepare_corpus
from torch_mosa.inference.calibrate import calibrate_on_dataset, uncalibrated
from torch_mosa.inference.limits import set_causal_limits
from torch_mosa.inference.report import decode_tokens_per_second, kv_cache_footprint
from torch_mosa.runs import load_model, resolve_checkpoint, tokenizer_dir, training_data_dir
from torch_mosa.train.evaluate import evaluate


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, *, split: str = "val", batch_size: int = 8,
                        seq_len: int | None = None, max_batches: int | None = None,
                        device: torch.device | str = "cpu", progress: bool = False, routing: str = "topk",
                        calibrate_batches: int = 0, decode_tokens: int = 0, causal_capacity: int | None = None,
                        pack_documents: bool = False, per_window: bool = False) -> dict:
    """Evaluate a checkpoint (or a run directory's latest) on `split` of `data`.

    data: None (the run's own training data), a prepared shard directory (its tokenizer must be the model's), or
    raw text, tokenized here with the run's tokenizer and evaluated whole (the `split` is then ignored).
    seq_len defaults to the model's max_seq_len. routing: "topk" (the paper's, non-causal) or "causal"; with
    "causal" the KV-cache footprint of one batch is measured too (kv_pairs_per_token, kv_bytes_per_token), and
    calibrate_batches > 0 first calibrates the causal thresholds on that many batches of the training split
    (otherwise the checkpoint's thresholds are used), and decode_tokens > 0 times greedy decoding of that many
    tokens for one sequence after a prompt of half a window (decode_tokens_per_s). causal_capacity: the most
    tokens a MoSA head keeps per sequence under causal routing (the causal forward, calibration and decode then run
    at that member width; joins beyond it are dropped and reported in causal_overflow_rate); None = no limit.
    pack_documents: keep the documents of each window apart, split at the end-of-text token (as training with
    --pack-documents does). per_window: also `window_losses` (each window's mean loss, in split order),
    `window_documents` (the document holding each window's first target) and `document_labels` (each document's
    first line), for `per_document` and paired comparisons (`torch_mosa.statistics.paired_difference`).
    Returns evaluate()'s dict plus checkpoint, data, split, routing, pack_documents.
    """
    path = resolve_checkpoint(checkpoint)
    model, config = load_model(path, device)
    if causal_capacity is not None:
        set_causal_limits(model, capacity=causal_capacity)
    seq_len = seq_len or config.max_seq_len
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={config.max_seq_len}")
    # bf16 autocast on CUDA, as training runs there; fp32 elsewhere
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        return _evaluate_loaded(model, config, path, data, split, batch_size, seq_len, max_batches, device, progress,
                                routing, calibrate_batches, decode_tokens, pack_documents, per_window)


def window_documents(dataset: TokenDataset, seq_len: int, windows: int) -> dict:
    """{window_documents: the document (index in the split) of each evaluation window's first target token,
    document_labels: each document's first line, at most 60 characters}. Window i starts at token i * seq_len."""
    ends = dataset.end_of_text_positions()
    first_targets = np.arange(windows, dtype=np.int64) * seq_len + 1
    labels = []
    for doc in range(len(ends) + (1 if len(ends) == 0 or ends[-1] < dataset.num_tokens - 1 else 0)):
        start = 0 if doc == 0 else int(ends[doc - 1]) + 1
        head = dataset.window(start, min(64, dataset.num_tokens - start))
        text = dataset.tokenizer.decode(head.tolist()).strip()
        labels.append((text.splitlines() or [""])[0][:60])
    return {"window_documents": np.searchsorted(ends, first_targets).tolist(), "document_labels": labels}


def losses_by_document(result: dict) -> dict[int, list[float]]:
    """A per_window result's window losses grouped by document, in split order."""
    groups: dict[int, list[float]] = {}
    for doc, loss in zip(result["window_documents"], result["window_losses"]):
        groups.setdefault(doc, []).append(loss)
    return dict(sorted(groups.items()))


def per_document(result: dict) -> list[dict]:
    """Per-document view of a per_window result: [{document, label, windows, loss, ppl}] in split order (documents
    with no evaluated window left out)."""
    return [{"document": doc, "label": result["document_labels"][doc], "windows": len(losses),
             "loss": sum(losses) / len(losses), "ppl": math.exp(sum(losses) / len(losses))}
            for doc, losses in losses_by_document(result).items()]


def _evaluate_loaded(model, config, path, data, split, batch_size, seq_len, max_batches, device, progress, routing,
                     calibrate_batches, decode_tokens, pack_documents, per_window) -> dict:
    if calibrate_batches and routing == "causal":
        shards = data if data is not None and is_shard_dir(data) else None
        train = TokenDataset(training_data_dir(path, shards), "train")
        calibrate_on_dataset(model, train, batch_size, seq_len, calibrate_batches, device, progress=progress)
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
            prepare_corpus(data, data_dir, tokenizer=str(tokenizer_dir(path)), val_fraction=0.0, progress=progress)
        dataset = TokenDataset(data_dir, split)
        if dataset.vocab_size != config.vocab_size:
            raise ValueError(f"data {str(data_dir)!r} has vocab_size={dataset.vocab_size} but the model of {path} has "
                             f"{config.vocab_size}: evaluate on data tokenized with the model's tokenizer")
        result = evaluate(model, dataset, batch_size, seq_len, max_batches, device, progress=progress,
                          pack_documents=pack_documents, per_window=per_window, routing=routing)
        if per_window:
            result.update(window_documents(dataset, seq_len, len(result["window_losses"])))
        if routing == "causal":
            x, _ = next(iter_eval_batches(dataset, batch_size, seq_len, 1, device=device))
            footprint = kv_cache_footprint(model, x)
            result.update(kv_pairs_per_token=footprint["pairs_per_token"],
                          kv_pairs_per_sequence=footprint["pairs_per_sequence"],
                          kv_bytes_per_token=footprint["bytes_per_token"])
            if decode_tokens:
                prompt = x[:1, : max(1, min(seq_len // 2, config.max_seq_len - decode_tokens - 4))]
                result["decode_tokens_per_s"] = decode_tokens_per_second(model, prompt, decode_tokens)
    return {**result, "checkpoint": str(path), "data": str(data or data_dir), "split": split, "routing": routing,
            "pack_documents": pack_documents}
