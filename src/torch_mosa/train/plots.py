"""PNG figures: loss curves of runs, perplexity vs sparsity of a comparison (the paper's Figure 3), and the tokens
MoSA heads pick on a text (`mosa inspect`)."""

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


def plot_loss_vs_lr(runs: list[dict], out_path: str | Path) -> Path:
    """Validation loss against learning rate (log axis), one line per family of a comparison's sweep, each
    family's best rate marked. A run with "val_loss_interval" (low, high) gets it as an error bar."""
    plt = _pyplot()
    families = list(dict.fromkeys(r["family"] for r in runs))
    legend_below = len(families) > 4  # many families: below the axes, where it cannot cover the points
    figure, axes = plt.subplots(figsize=(9, 6 + 0.2 * len(families)) if legend_below else (6, 4.5))
    if len(families) > 10:  # the default cycle repeats after 10 colours
        axes.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for family in families:
        points = sorted(((r["lr"], r["val_loss"], r.get("val_loss_interval")) for r in runs if r["family"] == family),
                        key=lambda p: p[:2])
        lrs, losses = [p[0] for p in points], [p[1] for p in points]
        if all(p[2] is not None for p in points):
            below = [loss - p[2][0] for loss, p in zip(losses, points)]
            above = [p[2][1] - loss for loss, p in zip(losses, points)]
            line = axes.errorbar(lrs, losses, yerr=[below, above], fmt="o-", capsize=3, label=family).lines[0]
        else:
            (line,) = axes.plot(lrs, losses, "o-", label=family)
        axes.plot(*min(zip(lrs, losses), key=lambda p: p[1]), "*", markersize=14, color=line.get_color())
    axes.set_xscale("log")
    rates = sorted({r["lr"] for r in runs})
    axes.set_xticks(rates, [f"{lr:g}" for lr in rates])  # the swept rates themselves, not log-axis decades
    axes.minorticks_off()
    axes.set_xlabel("peak learning rate")
    axes.set_ylabel("validation loss (nats/token)")
    axes.set_title("Learning-rate sweep (star: each family's best)")
    axes.grid(alpha=0.3)
    if legend_below:
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize="small")
    else:
        axes.legend()
    return _save(figure, out_path, plt)


def plot_ppl_vs_tokens(points: list[dict], out_path: str | Path) -> Path:
    """Validation perplexity (log axis) against training tokens, one line per series. points: dicts with
    "series", "tokens", "ppl" and optionally "ppl_interval" (low, high), drawn as an error bar."""
    plt = _pyplot()
    names = list(dict.fromkeys(p["series"] for p in points))
    figure, axes = plt.subplots(figsize=(8, 6))
    for name in names:
        mine = sorted((p for p in points if p["series"] == name), key=lambda p: p["tokens"])
        tokens, ppl = [p["tokens"] / 1e6 for p in mine], [p["ppl"] for p in mine]
        if all(p.get("ppl_interval") for p in mine):
            below = [v - p["ppl_interval"][0] for v, p in zip(ppl, mine)]
            above = [p["ppl_interval"][1] - v for v, p in zip(ppl, mine)]
            axes.errorbar(tokens, ppl, yerr=[below, above], fmt="o-", capsize=3, label=name)
        else:
            axes.plot(tokens, ppl, "o-", label=name)
    axes.set_yscale("log")
    axes.set_xlabel("training tokens (millions)")
    axes.set_ylabel("validation perplexity")
    axes.set_title("Perplexity against training tokens (each point at its best learning rate)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize="small")  # below: off the points
    return _save(figure, out_path, plt)


def plot_head_selections(selections: dict[int, object], token_labels: list[str], out_path: str | Path,
                         max_heads: int = 32, title: str | None = None) -> Path:
    """One panel per MoSA layer: a token x head grid of sequence 0 of each RecordedSelection ({layer number:
    selection}), coloured by the router score where the head took the token and blank where it did not. At most
    `max_heads` heads (the first ones) per panel; the panel title says when more were left out."""
    import numpy as np

    plt = _pyplot()
    seq_len = len(token_labels)
    heads_shown = [min(max_heads, selection.indices.shape[1]) for selection in selections.values()]
    width = min(40.0, max(6.0, 0.16 * seq_len + 2.0))
    heights = [0.2 * heads + 1.6 for heads in heads_shown]
    figure, axes_list = plt.subplots(len(selections), 1, figsize=(width, sum(heights) + 0.4), squeeze=False,
                                     gridspec_kw={"height_ratios": heights})
    colormap = plt.get_cmap("viridis").with_extremes(bad="white")
    for axes, (number, selection), heads in zip(axes_list[:, 0], selections.items(), heads_shown):
        grid = np.full((heads, seq_len), np.nan)
        indices = selection.indices[0, :heads].cpu().numpy()
        scores = selection.scores[0, :heads].float().cpu().numpy()
        for head in range(heads):
            taken = scores[head] > 0
            grid[head, indices[head][taken]] = scores[head][taken]
        image = axes.imshow(np.ma.masked_invalid(grid), cmap=colormap, vmin=0.0, vmax=1.0, aspect="auto",
                            interpolation="nearest")
        total, k = selection.indices.shape[1:]
        shown = f"heads 0-{heads - 1} of {total}" + (" (truncated: raise --heads)" if heads < total else "")
        axes.set_title(f"MoSA layer {number}: {shown}, {k} tokens per head", fontsize="medium", loc="left")
        axes.set_ylabel("head")
        axes.set_yticks(range(0, heads, max(1, heads // 8)))
        axes.set_xticks(range(seq_len))
        axes.set_xticklabels(token_labels, rotation=90, fontsize=7, fontfamily="monospace")
        axes.tick_params(axis="x", length=0)
        figure.colorbar(image, ax=axes, fraction=0.02, pad=0.01, label="router score")
    if title:
        figure.suptitle(title, fontsize="medium")
    return _save(figure, out_path, plt, dpi=100)


def _save(figure, out_path: str | Path, plt, dpi: int = 120) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out_path, dpi=dpi)
    plt.close(figure)
    return out_path
