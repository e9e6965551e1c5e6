"""Markdown for benchmark results: environment header, the case table and the training-step table."""

from __future__ import annotations

import datetime
import platform
import sys


def environment() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "gpu": gpu,
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def _cell(value, dense=None) -> str:
    if value is None:
        return "not run"
    ms, mib = value
    ratio = f" ({ms / dense[0]:.2f}x, {mib / dense[1]:.2f}x mem)" if dense else ""
    return f"{ms:.3f} ms, {mib:.0f} MiB{ratio}"


def markdown_report(rows, train_rows=(), command: str | None = None, notes=()) -> str:
    env = environment()
    lines = ["# MoSA layer benchmark", "",
             f"- date: {env['date']}", f"- GPU: {env['gpu']}",
             f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}",
             f"- command: `{command or ' '.join(sys.argv)}`",
             "- one attention layer, bf16 parameters and input, forward+backward, median of "
             "triton.testing.do_bench after warm-up on random data; peak = torch.cuda.max_memory_allocated over "
             "one forward+backward (parameters, input and gradients included)", ""]
    if rows:
        lines += ["| case | heads | k | B x T | dense | reference path | fast path |", "|---|---|---|---|---|---|---|"]
    for case, result in rows:
        dense = result.get("dense")
        heads = f"{case.num_dense_heads}+{case.num_mosa_heads} vs {case.dense_heads}"
        lines.append(f"| {case.name} | {heads} | {case.k} | {case.batch} x {case.seq_len} | {_cell(dense)} | "
                     f"{_cell(result.get('reference'), dense)} | {_cell(result.get('fast'), dense)} |")
    if train_rows:
        lines += ["", "Full training step, tiny preset (6 layers, h=512, T=1024), autocast bf16, fused AdamW:", "",
                  "| model | batch | tokens/s | vs dense | peak MiB |", "|---|---|---|---|---|"]
        dense_rate = train_rows[0][2]
        for name, batch, tokens_per_s, mib in train_rows:
            lines.append(f"| {name} | {batch} | {tokens_per_s:,.0f} | {tokens_per_s / dense_rate:.2f}x | {mib:.0f} |")
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
