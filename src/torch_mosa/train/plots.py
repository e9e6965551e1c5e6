"""PNG figures: loss curves of runs, and perplexity vs sparsity of a comparison (the paper's Figure 3)."""

from __future__ import annotations

from pathlib import Path

from torch_mosa.train.metrics import read_metrics


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported on first use (an optional dependency)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'torch-mosa[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(run_dirs: list[str | Path], out_path: str | Path, labels: list[str] | None = None) -> Path:
    """Training loss (lines) and validation loss (markers) against tokens seen, one colour per run."""
    labels = labels or [Path(run).name for run in run_dirs]
    curves = []
    for run in run_dirs:
        rows = read_metrics(run)
        if not rows:
            raise FileNotFoundError(f"{str(run)!r} has no metrics.csv rows: is it a training run directory?")
        curves.append(rows)
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for rows, label in zip(curves, labels):
        train = [r for r in rows if r["train_loss"] is not None]
        val = [r for r in rows if r["val_loss"] is not None]
        (line,) = axes.plot([r["tokens"] for r in train], [r["train_loss"] for r in train], ".-",
                          label=f"{label} train")
        axes.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o--", color=line.get_color(),
                  label=f"{label} val")
    axes.set_xlabel("tokens")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, out_path, plt)


def plot_ppl_vs_sparsity(results: list[dict], out_path: str | Path) -> Path:
    """Validation perplexity against sparsity (log2 axis), one line per attention kind; the dense baseline
    (sparsity 1) starts every line and is also drawn as a horizontal reference."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4.5))
    dense = [r for r in results if r["attention"] == "dense"]
    for attention in dict.fromkeys(r["attention"] for r in results if r["attention"] != "dense"):
        points = sorted((r["sparsity"], r["val_ppl"]) for r in results if r["attention"] == attention)
        points = [(1, dense[0]["val_ppl"])] + points if dense else points
        axes.plot(*zip(*points), "o-", label=attention)
    if dense:
        axes.axhline(dense[0]["val_ppl"], color="gray", linestyle="--", label="dense baseline")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("sparsity")
    axes.set_ylabel("validation perplexity")
    axes.set_title("IsoFLOP models: perplexity vs sparsity")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, out_path, plt)


def _save(figure, out_path: str | Path, plt) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
    return out_path
