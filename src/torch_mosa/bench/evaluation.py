"""Evaluation speed under each routing (issue 11): the forward pass `mosa eval` runs, timed for top-k routing (the
paper's, which sees the future) and for causal routing (per-head thresholds, as generation routes), with and
without a capacity per head (with one, every MoSA head runs at that width instead of T).

Random weights in bf16, thresholds calibrated on random tokens (bench/decode.py's `build_model`), no gradients.
"""

from __future__ import annotations

import statistics
import time

import torch

from torch_mosa.bench.decode import build_model
from torch_mosa.inference.limits import set_causal_limits, suggested_causal_limits


@torch.no_grad()
def eval_tokens_per_second(model, routing: str, batch: int, seq_len: int) -> float:
    """Tokens/s of model(ids, routing=routing) on random ids [batch, seq_len]: the median of triton's do_bench on
    CUDA, else of three timed calls after one warm-up."""
    device = model.lm_head.weight.device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    if device.type == "cuda":
        import triton

        seconds = triton.testing.do_bench(lambda: model(ids, routing=routing)) / 1e3
    else:
        model(ids, routing=routing)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            model(ids, routing=routing)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
    return batch * seq_len / seconds


def run_eval_routing_bench(name: str = "mosa IsoFLOP s64", preset: str = "tiny", batch: int = 16,
                           seq_len: int | None = None, device="cuda", dtype=torch.bfloat16, log=print) -> list[dict]:
    """Rows {routing, capacity, tokens_per_s, vs_topk} for top-k, causal at the suggested capacity (what the decode
    benchmark and generation use) and causal without a capacity (width T), as `mosa eval --routing topk causal
    [--causal-capacity N]` runs them."""
    model = build_model(name, preset, device, dtype)
    seq_len = seq_len or model.config.max_seq_len
    capacity = suggested_causal_limits(model, seq_len)["capacity"]
    rows = []
    for routing, limit in (("topk", None), ("causal", capacity), ("causal", None)):
        set_causal_limits(model, capacity=limit)
        tokens_per_s = eval_tokens_per_second(model, routing, batch, seq_len)
        rows.append({"model": name, "routing": routing, "capacity": limit, "batch": batch, "seq_len": seq_len,
                     "tokens_per_s": tokens_per_s, "vs_topk": tokens_per_s / rows[0]["tokens_per_s"] if rows else 1.0})
        log(f"eval {name} {routing} capacity={limit}: {tokens_per_s:,.0f} tokens/s")
    return rows


def eval_routing_markdown(rows, header_lines) -> str:
    lines = list(header_lines) + ["", "| model | routing | capacity per head | B x T | tokens/s | vs top-k |",
                                  "|---|---|---|---|---|---|"]
    for row in rows:
        routing = "top-k (sees the future)" if row["routing"] == "topk" else "causal"
        capacity = "-" if row["routing"] == "topk" else ("none (width T)" if row["capacity"] is None
                                                          else str(row["capacity"]))
        lines.append(f"| {row['model']} | {routing} | {capacity} | {row['batch']} x {row['seq_len']} | "
                     f"{row['tokens_per_s']:,.0f} | {row['vs_topk']:.2f}x |")
    return "\n".join(lines) + "\n"
