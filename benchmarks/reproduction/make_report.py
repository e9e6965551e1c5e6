"""Tables and plots of docs/reproduction.md from the committed results of the GPU sweep.

    python benchmarks/reproduction/make_report.py   # prints the markdown tables, writes docs/reproduction_*.png

Reads benchmarks/reproduction/results/*-results-*.jsonl (one line per run: commands, summary.json, eval results)
and *-runs-*.tar.gz (each run's config.json, metrics.csv, summary.json).
"""

from __future__ import annotations

import csv
import io
import json
import math
import tarfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parents[2] / "docs"
# The paper's Tiny perplexities by sparsity (SPEC §4; sparsity 1 = dense)
PAPER_TINY = {1: 22.46, 2: 21.76, 4: 20.45, 8: 19.24, 16: 18.00, 32: 16.90, 64: 16.39}


def load_runs() -> dict[str, dict]:
    runs = {}
    for path in sorted(RESULTS.glob("call*-results-*.jsonl")):  # the first study (issue 7)
        for line in path.read_text().splitlines():
            record = json.loads(line)
            record["eval"] = {e["routing"]: e for e in record["eval"]}
            runs[record["name"]] = record
    for path in sorted(RESULTS.glob("call*-runs-*.tar.gz")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                name, file = member.name.split("/")
                if file == "metrics.csv" and name in runs:
                    text = tar.extractfile(member).read().decode()
                    runs[name]["metrics"] = list(csv.DictReader(io.StringIO(text)))
    return runs


def label(run: dict) -> str:
    kind = {"dense": "dense", "mosa": "MoSA hybrid", "pure_mosa": "pure MoSA", "fixed": "fixed sparse",
            "routing": "Routing"}[run["attention"]]
    sparsity = "" if run["attention"] == "dense" else f" rho={run['sparsity']}"
    seed = f" (seed {run['seed']})" if run["seed"] else ""
    return kind + sparsity + seed


def heads(summary: dict) -> str:
    return " + ".join(f"{n} {kind}" for kind, n in summary["head_counts"].items())


def table1(runs: dict, dense_ppl: float) -> str:
    rows = ["| model | heads / layer | params | fwd GFLOPs / seq (1024 tok) | val ppl (top-k) | vs dense | paper ppl "
            "| paper vs dense | train tokens/s | peak GPU mem | wall-clock |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        if name == "t2":
            continue
        s, ppl = run["summary"], run["eval"]["topk"]["ppl"]
        paper = PAPER_TINY.get(run["sparsity"]) if run["attention"] in ("dense", "mosa") else None
        paper_cells = (f"{paper:.2f} | {100 * (paper / PAPER_TINY[1] - 1):+.1f}%" if paper else "- | -")
        rows.append(f"| {label(run)} | {heads(s)} | {s['params'] / 1e6:.1f}M | "
                    f"{s['forward_flops_per_token'] * 1024 / 1e9:.2f} | {ppl:.2f} | {100 * (ppl / dense_ppl - 1):+.1f}% | "
                    f"{paper_cells} | {s['tokens_per_s']:,.0f} | {s['peak_memory_bytes'] / 2 ** 30:.1f} GiB | "
                    f"{s['wall_clock_s']:.0f} s |")
    return "\n".join(rows)


def causal_table(runs: dict) -> str:
    rows = ["| model | val ppl, top-k (paper-style, non-causal) | val ppl, causal routing | causal vs top-k "
            "| KV pairs / sequence (measured) | paper formula T*H_dense + k*H_mosa | KV vs dense |",
            "|---|---|---|---|---|---|---|"]
    dense_pairs = runs["dense"]["eval"]["causal"]["kv_pairs_per_sequence"]
    for name, run in runs.items():
        if "causal" not in run["eval"]:
            rows.append(f"| {label(run)} | {run['eval']['topk']['ppl']:.2f} | no causal mode | - | - | - | - |")
            continue
        s, topk, causal = run["summary"], run["eval"]["topk"]["ppl"], run["eval"]["causal"]
        counts, k = s["head_counts"], max(2, 1024 // run["sparsity"])
        sparse = counts.get("mosa", 0) + counts.get("fixed", 0)
        formula = 6 * (1024 * counts.get("dense", 0) + k * sparse)
        rows.append(f"| {label(run)} | {topk:.2f} | {causal['ppl']:.2f} | {100 * (causal['ppl'] / topk - 1):+.1f}% | "
                    f"{causal['kv_pairs_per_sequence']:,.0f} | {formula:,} | "
                    f"{100 * (causal['kv_pairs_per_sequence'] / dense_pairs - 1):+.1f}% |")
    return "\n".join(rows)


def table2(runs: dict) -> str:
    rows = ["| model | heads / layer | params | val ppl (top-k) | val ppl (causal) | ms / training step (64 x 1024) "
            "| peak GPU mem | KV pairs / sequence | decode tokens/s (batch 1) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("dense", "dense-seed1", "t2"):
        if name not in runs:
            continue
        run = runs[name]
        s, causal = run["summary"], run["eval"]["causal"]
        title = "MoSA 4 dense + 17 MoSA, rho=32" if name == "t2" else label(run)
        rows.append(f"| {title} | {heads(s)} | {s['params'] / 1e6:.1f}M | {run['eval']['topk']['ppl']:.2f} | "
                    f"{causal['ppl']:.2f} | {1000 * 64 * 1024 / s['tokens_per_s']:.1f} | "
                    f"{s['peak_memory_bytes'] / 2 ** 30:.1f} GiB | {causal['kv_pairs_per_sequence']:,.0f} | "
                    f"{causal['decode_tokens_per_s']:.1f} |")
    return "\n".join(rows)


def plots(runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    mosa = sorted((r["sparsity"], r["eval"]["topk"]["ppl"]) for r in runs.values()
                  if r["attention"] == "mosa" and r["seed"] == 0 and r["name"] != "t2")
    dense = [r["eval"]["topk"]["ppl"] for r in runs.values() if r["attention"] == "dense"]
    axis.plot([1] + [s for s, _ in mosa], [dense[0]] + [p for _, p in mosa], "o-", label="MoSA hybrid (ours)")
    for name, marker in (("fixed16", "s"), ("routing16", "^"), ("pure4", "D")):
        if name in runs:
            axis.plot(runs[name]["sparsity"], runs[name]["eval"]["topk"]["ppl"], marker, label=label(runs[name]))
    axis.axhspan(min(dense), max(dense), color="gray", alpha=0.3, label="dense (2 seeds)")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("sparsity rho")
    axis.set_ylabel("validation perplexity")
    axis.set_title("Tiny IsoFLOP, 40M tokens of Gutenberg (ours)")
    twin = axis.twinx()
    twin.plot(list(PAPER_TINY), list(PAPER_TINY.values()), "k--", alpha=0.5, label="paper (C4, 6.5B tokens)")
    twin.set_ylabel("paper perplexity (dashed)")
    axis.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(DOCS / "reproduction_ppl_vs_sparsity.png", dpi=120)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, run in runs.items():
        rows = [r for r in run.get("metrics", []) if r.get("val_loss")]
        axis.plot([int(r["tokens"]) / 1e6 for r in rows], [float(r["val_loss"]) for r in rows], label=label(run)
                  if name != "t2" else "MoSA 4+17 rho=32")
    axis.set_xlabel("training tokens (M)")
    axis.set_ylabel("validation loss (nats/token)")
    axis.set_ylim(top=6.5)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(DOCS / "reproduction_loss_curves.png", dpi=120)


def main() -> None:
    runs = load_runs()
    dense_ppl = runs["dense"]["eval"]["topk"]["ppl"]
    print("## Table 1\n\n" + table1(runs, dense_ppl))
    print("\n## Causal\n\n" + causal_table(runs))
    print("\n## Table 2\n\n" + table2(runs))
    seeds = [runs[n]["eval"]["topk"]["ppl"] for n in ("dense", "dense-seed1")]
    mosa = [runs[n]["eval"]["topk"]["ppl"] for n in ("mosa64", "mosa64-seed1")]
    print(f"\nseed spread: dense {seeds}, mosa64 {mosa}; relative {100 * (math.fsum(mosa) / math.fsum(seeds) - 1):+.1f}%")
    print("\n## Commands\n")
    for name, run in runs.items():
        print(f"- {name}: `{run['train_command']}` then `{run['eval_command']}`")
    plots(runs)


if __name__ == "__main__":
    main()
