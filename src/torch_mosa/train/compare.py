"""The IsoFLOP comparison of the paper (Figure 3): a dense baseline and FLOP-matched sparse models trained on the
same tokens with the same schedule, each family (attention kind and sparsity) at every learning rate of a sweep and
reported at its own best rate, as a markdown table, a perplexity-vs-sparsity plot and a loss-vs-rate plot.

One learning rate for every model ranks the models by how well that rate suits each of them: the library's own
reproduction overstated MoSA's gain by half that way (docs/reproduction.md). So every family is trained at every
rate, on the same tokens in the same order, and compared at its best.

Layout of the output directory: `data/` (prepared once, shared by every run), one run directory per family and
rate (`dense-lr0.002`, `mosa-s4-lr0.002`, ...), `comparison.json` (every run, and the best rate of each family),
`comparison.md`, `ppl_vs_sparsity.png` and `loss_vs_lr.png`. A run whose saved configuration equals the requested
one is reused when finished and resumed when interrupted, so a repeated command continues where it stopped; a run
directory trained with another configuration (other --tokens, --lr, model, data...) is refused, not reused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch_mosa.config import MoSAConfig
from torch_mosa.data.shards import read_meta
from torch_mosa.runs import CONFIG_FILE, latest_checkpoint, read_config
from torch_mosa.train.config import TrainConfig
from torch_mosa.train.data import absolute_data_spec, prepare_data
from torch_mosa.train.metrics import SUMMARY_FILE, read_summary
from torch_mosa.train.plots import plot_loss_vs_lr, plot_ppl_vs_sparsity
from torch_mosa.train.trainer import Trainer

RESULT_FIELDS = ("val_loss", "val_ppl", "val_bpb", "params", "forward_flops_per_token", "tokens_per_s",
                 "peak_memory_bytes", "peak_memory_kind", "head_counts", "steps", "tokens", "val_recall_accuracy")
# TrainConfig fields that do not change what a run computes: a run differing only in them is the same run.
COSMETIC_FIELDS = ("progress", "tensorboard", "log_interval", "device", "compile")


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
                   train_config: TrainConfig, model_overrides: dict | None = None,
                   lrs: list[float] | None = None) -> dict:
    """Train every model of `comparison_plan` at every rate of `lrs` on `tokens` training tokens each.

    train_config supplies the data spec, batch size, sequence length and the other optimizer settings; its
    `steps` is replaced by tokens // (batch_size * seq_len) so that every model sees the same tokens in the same
    order, and its `lr` by each rate of `lrs` (None: train_config.lr alone). The models' max_seq_len is the
    training seq_len, where the IsoFLOP head counts are matched (SPEC §3).
    Returns {"runs": one result per (family, rate), "best": the result of each family at its lowest validation
    loss}, as written to comparison.json with the preset, tokens and rates.
    """
    out_dir = Path(out_dir)
    model_overrides = model_overrides or {}
    lrs = sorted(set(lrs or [train_config.lr]))
    for lr in lrs:
        TrainConfig(lr=lr)  # the same check as a single run's
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
    vocab_size = read_meta(data_dir)["vocab_size"]
    base_config = dataclasses.replace(train_config, data=absolute_data_spec(str(data_dir)), steps=steps, seq_len=seq_len)

    runs = []
    for (attention, sparsity), config in zip(plan, configs):
        family = attention if sparsity is None else f"{attention}-s{sparsity}"
        for lr in lrs:
            run_config = dataclasses.replace(base_config, lr=lr)
            run_dir = out_dir / f"{family}-lr{lr:g}"
            summary = _reuse_or_train(run_dir, dataclasses.replace(config, vocab_size=vocab_size), run_config,
                                      label=f"{family} lr {lr:g}")
            runs.append({"attention": attention, "sparsity": sparsity or 1, "family": family, "lr": lr,
                         "run": run_dir.name, **{field: summary.get(field) for field in RESULT_FIELDS}})
    best = [min((r for r in runs if r["family"] == family), key=lambda r: r["val_loss"])
            for family in dict.fromkeys(r["family"] for r in runs)]
    comparison = {"preset": preset, "tokens": runs[0]["tokens"], "steps": steps, "batch_size": base_config.batch_size,
                  "seq_len": seq_len, "data": base_config.data, "lrs": lrs, "best": best, "runs": runs}
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    (out_dir / "comparison.md").write_text(comparison_table(comparison) + "\n")
    plot_ppl_vs_sparsity(best, out_dir / "ppl_vs_sparsity.png")
    plot_loss_vs_lr(runs, out_dir / "loss_vs_lr.png")
    return comparison


def _reuse_or_train(run_dir: Path, model_config: MoSAConfig, train_config: TrainConfig, label: str) -> dict:
    """The summary of the run in `run_dir`: reused when finished with this very configuration, resumed when
    interrupted, trained when absent; a run of another configuration is refused, naming what differs."""
    if (run_dir / CONFIG_FILE).is_file():
        saved = read_config(run_dir)
        requested = {"model": model_config.to_dict(), "train": train_config.to_dict()}
        differ = sorted(f"{section}.{name}: {saved.get(section, {}).get(name)!r} vs {value!r}"
                        for section in ("model", "train") for name, value in requested[section].items()
                        if name not in COSMETIC_FIELDS and saved.get(section, {}).get(name) != value)
        if differ:
            raise ValueError(f"{str(run_dir)!r} holds a run of another configuration (saved vs requested: "
                             f"{'; '.join(differ)}): remove it or choose another --out")
        if (run_dir / SUMMARY_FILE).is_file():
            return read_summary(run_dir)
    resume = latest_checkpoint(run_dir) is not None
    return Trainer(model_config, train_config, run_dir, resume=resume, label=label).train()


def comparison_table(comparison: dict) -> str:
    """Markdown: each family at its best learning rate (dense baseline first), then the whole sweep; every row
    states its rate and tokens."""
    runs, lrs = comparison["runs"], comparison["lrs"]
    lines = [f"IsoFLOP comparison, preset {comparison['preset']}: {comparison['tokens']:,} training tokens per model "
             f"({comparison['steps']} steps of {comparison['batch_size']} x {comparison['seq_len']}), "
             f"data {comparison['data']}; each family at its best learning rate of "
             f"{', '.join(f'{lr:g}' for lr in lrs)}.",
             "",
             "| attention | sparsity | best lr | tokens | heads per layer | params | fwd MFLOPs/token | val ppl | "
             "tokens/s | peak memory |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in comparison["best"]:
        heads = " + ".join(f"{n} {kind}" for kind, n in r["head_counts"].items())
        memory = (f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB" if r["peak_memory_kind"] == "cuda_allocated" else "n/a")
        lines.append(f"| {r['attention']} | {r['sparsity']} | {r['lr']:g} | {r['tokens']:,} | {heads} | "
                     f"{r['params']:,} | {r['forward_flops_per_token'] / 1e6:,.2f} | {r['val_ppl']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {memory} |")
    if any(r["peak_memory_kind"] != "cuda_allocated" for r in runs):
        lines += ["", "Peak memory is measured on CUDA only (n/a: a CPU run, where the runs share one process)."]
    lines += ["", "Validation perplexity of every run of the sweep (tokens per run as above):", "",
              "| family | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
              "|---|" + "---:|" * len(lrs)]
    for family in dict.fromkeys(r["family"] for r in runs):
        ppl = {r["lr"]: r["val_ppl"] for r in runs if r["family"] == family}
        lines.append(f"| {family} | " + " | ".join(f"{ppl[lr]:.3f}" for lr in lrs) + " |")
    return "\n".join(lines)
