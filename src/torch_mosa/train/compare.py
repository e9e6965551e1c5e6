"""The IsoFLOP comparison of the paper (Figure 3): a dense baseline and FLOP-matched sparse models trained on the
same tokens with the same schedule, summarized as a markdown table and a perplexity-vs-sparsity plot.

Layout of the output directory: `data/` (prepared once, shared by every run), one run directory per model
(`dense`, `mosa-s4`, ...), `comparison.json`, `comparison.md` and `ppl_vs_sparsity.png`. A run that already has
its summary.json is reused and one with checkpoints resumed, so an interrupted comparison continues where it
stopped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch_mosa.config import MoSAConfig
from torch_mosa.train.checkpoint import latest_checkpoint
from torch_mosa.train.config import TrainConfig
from torch_mosa.train.data import prepare_data
from torch_mosa.train.metrics import SUMMARY_FILE, read_summary
from torch_mosa.train.plots import plot_ppl_vs_sparsity
from torch_mosa.train.trainer import Trainer

RESULT_FIELDS = ("val_loss", "val_ppl", "val_bpb", "params", "forward_flops_per_token", "tokens_per_s",
                 "peak_memory_bytes", "peak_memory_kind", "head_counts", "steps", "tokens", "val_recall_accuracy")


def comparison_plan(attentions: list[str], sparsities: list[int]) -> list[tuple[str, int | None]]:
    """(attention, sparsity) of each run: the dense baseline once (asked for by sparsity 1 or attention 'dense'),
    then every other attention kind at every sparsity above 1."""
    for sparsity in sparsities:
        if isinstance(sparsity, bool) or not isinstance(sparsity, int) or sparsity < 1:
            raise ValueError(f"sparsities must be integers >= 1, got {sparsity!r}")
    plan: list[tuple[str, int | None]] = []
    if 1 in sparsities or "dense" in attentions:
        plan.append(("dense", None))
    plan += [(attention, sparsity) for attention in dict.fromkeys(attentions) if attention != "dense"
             for sparsity in sorted(set(sparsities)) if sparsity > 1]
    if not plan:
        raise ValueError(f"nothing to compare: attentions={attentions} sparsities={sparsities}")
    return plan


def run_comparison(preset: str, attentions: list[str], sparsities: list[int], tokens: int, out_dir: str | Path,
                   train_config: TrainConfig, model_overrides: dict | None = None) -> list[dict]:
    """Train every model of `comparison_plan` on `tokens` training tokens each; returns one result per run.

    train_config supplies the data spec, batch size, sequence length and optimizer settings; its `steps` is
    replaced by tokens // (batch_size * seq_len) so that every model sees the same tokens in the same order.
    The models' max_seq_len is the training seq_len, where the IsoFLOP head counts are matched (SPEC §3).
    """
    out_dir = Path(out_dir)
    model_overrides = model_overrides or {}
    plan = comparison_plan(attentions, sparsities)
    # FLOPs are matched at the model's max_seq_len, so every model is built for the training length.
    seq_len = train_config.seq_len or model_overrides.get("max_seq_len") or MoSAConfig.from_preset(preset).max_seq_len
    model_overrides = {**model_overrides, "max_seq_len": seq_len}
    configs = [MoSAConfig.from_preset(preset, attention=a, sparsity=s, **model_overrides) for a, s in plan]
    steps = tokens // (train_config.batch_size * seq_len)
    if steps < 1:
        raise ValueError(f"tokens={tokens} is less than one step of batch_size x seq_len = "
                         f"{train_config.batch_size} x {seq_len} tokens")
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(train_config.data, out_dir, tokenizer=train_config.tokenizer,
                            vocab_size=train_config.data_vocab_size, seq_len=seq_len, seed=train_config.seed,
                            progress=train_config.progress)
    run_config = dataclasses.replace(train_config, data=str(data_dir), steps=steps, seq_len=seq_len)

    results = []
    for (attention, sparsity), config in zip(plan, configs):
        run_dir = out_dir / (attention if sparsity is None else f"{attention}-s{sparsity}")
        if (run_dir / SUMMARY_FILE).is_file():
            summary = read_summary(run_dir)
        else:
            resume = latest_checkpoint(run_dir) is not None
            summary = Trainer(config, run_config, run_dir, resume=resume).train()
        results.append({"attention": attention, "sparsity": sparsity or 1, "run": run_dir.name,
                        **{field: summary.get(field) for field in RESULT_FIELDS}})

    (out_dir / "comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "comparison.md").write_text(comparison_table(results, preset, run_config) + "\n")
    plot_ppl_vs_sparsity(results, out_dir / "ppl_vs_sparsity.png")
    return results


def comparison_table(results: list[dict], preset: str, train_config: TrainConfig) -> str:
    """A markdown table of the runs, dense baseline first, then by attention kind and sparsity."""
    lines = [f"IsoFLOP comparison, preset {preset}: {results[0]['tokens']:,} training tokens per model "
             f"({train_config.steps} steps of {train_config.batch_size} x {train_config.seq_len}), "
             f"data {train_config.data}.",
             "",
             "| attention | sparsity | heads per layer | params | fwd MFLOPs/token | val ppl | tokens/s | peak memory |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        heads = " + ".join(f"{n} {kind}" for kind, n in r["head_counts"].items())
        memory = (f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB" if r["peak_memory_kind"] == "cuda_allocated" else "n/a")
        lines.append(f"| {r['attention']} | {r['sparsity']} | {heads} | {r['params']:,} | "
                     f"{r['forward_flops_per_token'] / 1e6:,.2f} | {r['val_ppl']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{memory} |")
    if any(r["peak_memory_kind"] != "cuda_allocated" for r in results):
        lines += ["", "Peak memory is measured on CUDA only (n/a: a CPU run, where the runs share one process)."]
    return "\n".join(lines)
