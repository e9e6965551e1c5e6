"""Tables and plots of the second study (issue 15) from the committed results of its device calls.

    python benchmarks/reproduction/make_report_v2.py [--results DIR] [--plots DIR]

Reads DIR/issue15-*-results-*.jsonl[.xz] (committed xz-compressed: the tree travels to the GPU machine beside the
data, within 64 MiB; one line per run, written by run_queue.py: commands, summary.json, the validation evaluations
with every window's loss, and the held-out and leak measurements under `other`) and prints markdown: the learning-
rate sweep of every family, the headline at each family's best rate (causal routing first; top-k is marked non-
causal), paired per-window differences against the best dense model with bootstrap 95% intervals, held-out sets, the
leak, and equal GPU time. Writes the sweep plot (one shared axis) to --plots.

A family is everything of a run but its learning rate and seed: attention, sparsity, sparse head count, training
routing, fixed offsets, shape and tokens. Each family's best rate is the one of lowest validation loss under causal
routing where the family has it (the rule generation uses), else under top-k.
"""

from __future__ import annotations

import argparse
import json
import math
import lzma
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from torch_mosa.statistics import bootstrap_interval, paired_difference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TOKENS = 40_000_000
CORPUS_TOKENS = None  # --corpus-tokens: the training split's size for runs that did not record it
KINDS = {"dense": "dense", "mosa": "MoSA", "pure_mosa": "pure MoSA", "fixed": "fixed", "routing": "Routing"}
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_size", "head_dim", "num_heads")


def load_runs(results: Path) -> list[dict]:
    """Every run, once: a run repeated in a later call (same family, rate and seed, e.g. rerun with the held-out
    and leak measurements) replaces the earlier one (calls sort by their number), which it keeps in its
    `repeats` list (training is not bitwise reproducible: repeats measure the spread between runs)."""
    runs = {}
    paths = sorted([*results.glob("issue15-*-results-*.jsonl"), *results.glob("issue15-*-results-*.jsonl.xz")],
                   key=lambda p: (_call_number(p.name), p.name))
    devices_file = results / "issue15-devices.json"  # the GPU of calls made before run_queue.py recorded it
    devices = json.loads(devices_file.read_text()) if devices_file.exists() else {}
    for path in paths:
        call = path.name.split("-results-")[0]
        text = lzma.decompress(path.read_bytes()).decode() if path.suffix == ".xz" else path.read_text()
        for line in text.splitlines():
            run = json.loads(line)
            run.setdefault("device", devices.get(call, "unknown GPU"))
            run["eval"] = {e["routing"]: e for e in run["eval"]}
            run["lr"] = learning_rate(run["train_command"])
            run["family"] = family(run)
            key = (run["family"], run["lr"], run["seed"])
            earlier = runs.get(key)
            run["repeats"] = [] if earlier is None else earlier["repeats"] + [earlier]
            runs[key] = run
    return list(runs.values())


def _call_number(name: str) -> int:
    """issue15-call12-results-0.jsonl -> 12 (files without a call number sort first)."""
    digits = "".join(c for c in name.split("-")[1] if c.isdigit()) if name.count("-") >= 2 else ""
    return int(digits) if digits else 0


def learning_rate(train_command: str) -> float | None:
    argv = shlex.split(train_command)
    return float(argv[argv.index("--lr") + 1]) if "--lr" in argv else None


def family(run: dict) -> str:
    """The run's family: its series (`series`) and, when not the default, its training tokens."""
    tokens = int(float(run.get("options", {}).get("tokens", DEFAULT_TOKENS)))
    return series(run) + (f", {tokens / 1e6:g}M tokens" if tokens != DEFAULT_TOKENS else "")


def series(run: dict, short: bool = False) -> str:
    """Kind of attention, sparsity, training routing and model shape: what a family is apart from its tokens.
    short: a smaller shape named by its layers and width only (plot legends)."""
    options = run.get("options", {})
    name = KINDS[run["attention"]]
    if run["attention"] != "dense":
        heads = f"4 + {run['num_sparse_heads']}, " if run.get("num_sparse_heads") else ""
        name += f" ({heads}sparsity {run['sparsity']})"
    if options.get("fixed_offsets") == "per_head":
        name += ", per-head offsets"
    if options.get("routing") == "causal":
        name += ", causal-trained"
    shape = [f"{key}={options[key]}" for key in SHAPE_KEYS if key in options]
    if shape and short:
        name += f", {options.get('num_layers', '?')} layers x {options.get('hidden_size', '?')}"
    elif shape:
        name += f", {' '.join(shape)}"
    return name


def headline_routing(run: dict) -> str:
    return "causal" if "causal" in run["eval"] and run["attention"] != "dense" else "topk"


def best_runs(runs: list[dict]) -> dict[str, dict]:
    """Each family's run at its best learning rate (seed 0)."""
    best = {}
    for run in runs:
        if run["seed"]:
            continue
        current = best.get(run["family"])
        loss = run["eval"][headline_routing(run)]["loss"]
        if current is None or loss < current["eval"][headline_routing(current)]["loss"]:
            best[run["family"]] = run
    return best


def shape_of(run: dict) -> tuple:
    """The model shape's overrides of the preset (none for the Tiny shape)."""
    return tuple((key, run.get("options", {})[key]) for key in SHAPE_KEYS if key in run.get("options", {}))


def reference_dense(best: dict[str, dict], run: dict | None = None) -> dict | None:
    """The dense baseline `run` is compared with: dense of run's model shape at its best rate; at the default
    shape, dense at the default token budget (a dense run given more tokens, e.g. for equal time, is a family of its
    own and never the reference); at another shape, that shape's dense run of the fewest tokens."""
    shape = () if run is None else shape_of(run)
    if not shape:
        return best.get(KINDS["dense"])
    same = [r for r in best.values() if r["attention"] == "dense" and shape_of(r) == shape]
    return min(same, key=lambda r: r["summary"]["tokens"]) if same else None


def sweep_table(runs: list[dict]) -> str:
    rates = sorted({r["lr"] for r in runs if r["lr"] is not None}) + ([None] if any(r["lr"] is None for r in runs)
                                                                         else [])
    best = best_runs(runs)
    rows = ["| family | " + " | ".join("train's default lr" if lr is None else f"lr {lr:g}" for lr in rates) + " |",
            "|---" * (len(rates) + 1) + "|"]
    for name in dict.fromkeys(r["family"] for r in runs):
        cells = []
        for lr in rates:
            found = [r for r in runs if r["family"] == name and r["lr"] == lr and not r["seed"]]
            if not found:
                cells.append("")
                continue
            run = found[0]
            text = " / ".join(f"{run['eval'][routing]['ppl']:.1f}" for routing in ("causal", "topk")
                              if routing in run["eval"] and (routing == "topk" or run["attention"] != "dense"))
            cells.append(f"**{text}**" if run is best[name] else text)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + ("\n\nValidation perplexity, causal / top-k (top-k routing sees the future: not causal); "
                              "dense has one number. Bold: the family's best rate.")


def headline_table(runs: list[dict]) -> str:
    best = best_runs(runs)
    rows = ["| family | best lr | val ppl, causal | val ppl, top-k (non-causal) | causal vs best dense of its shape "
            "(paired, 95% interval) | train tokens/s (GPU) | params | tokens / param | passes over the corpus |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, run in best.items():
        causal = run["eval"].get("causal") if run["attention"] != "dense" else run["eval"]["topk"]
        causal_ppl = f"{causal['ppl']:.2f}" if causal else "no causal mode"
        dense = reference_dense(best, run)
        versus = "-"
        if dense is not None and causal and run is not dense:
            versus = ratio_cell(causal, dense["eval"]["topk"])
        summary = run["summary"]
        rate = "default" if run["lr"] is None else f"{run['lr']:g}"
        rows.append(f"| {name} | {rate} | {causal_ppl} | {run['eval']['topk']['ppl']:.2f} | {versus} | "
                    f"{summary['tokens_per_s']:,.0f} ({run['device'].replace('NVIDIA ', '')}) | "
                    f"{summary['params'] / 1e6:.1f}M | "
                    f"{summary['tokens'] / summary['params']:.2f} | {passes(run)} |")
    return "\n".join(rows)


def passes(run: dict) -> str:
    """Training tokens over the corpus's (recorded by run_queue.py since session 7, else --corpus-tokens)."""
    corpus = run.get("corpus_tokens") or CORPUS_TOKENS
    return f"{run['summary']['tokens'] / corpus:.2f}" if corpus else "-"


def ratio_cell(a: dict, b: dict) -> str:
    """A's perplexity over B's on the same windows, with the bootstrap interval of the paired mean difference."""
    if "window_losses" not in a or "window_losses" not in b or len(a["window_losses"]) != len(b["window_losses"]):
        return f"{a['ppl'] / b['ppl'] - 1:+.1%} (unpaired)"
    paired = paired_difference(a["window_losses"], b["window_losses"])
    low, high = paired["ppl_ratio_interval"]
    return f"{paired['ppl_ratio'] - 1:+.1%} [{low - 1:+.1%}, {high - 1:+.1%}]"


def heldout_table(runs: list[dict]) -> str:
    best = best_runs(runs)
    sets = sorted({name for r in best.values() for name in r.get("other", {}) if name != "leak"})
    if not sets:
        return "(no held-out measurements yet)"
    rows = ["| family | " + " | ".join(f"{s}: ppl (vs best dense of its shape)" for s in sets) + " |",
            "|---" * (len(sets) + 1) + "|"]
    for name, run in best.items():
        dense = reference_dense(best, run)
        cells = []
        for s in sets:
            results = {e.get("routing"): e for e in run.get("other", {}).get(s, []) if "routing" in e}
            mine = results.get(headline_routing(run))
            if mine is None:
                cells.append("")
                continue
            theirs = None if dense is None else {e.get("routing"): e for e in dense["other"].get(s, [])}.get("topk")
            cells.append(f"{mine['ppl']:.2f}" + ("" if theirs is None or run is dense else
                                                 f" ({ratio_cell(mine, theirs)})"))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def dense_spread_table(runs: list[dict]) -> str:
    """Each family of the Tiny shape at its best rate against every run of the reference dense configuration (its
    rate, every seed and every repeat of a seed), on the validation windows and each held-out set: the dense runs'
    mean perplexity with their range, and each family's change against that mean with the range of its changes
    against the single dense runs.

    The window-bootstrap intervals of the other tables measure the windows' noise for one pair of runs. They do not
    capture the spread between training runs, which on held-out text is far larger (docs/reproduction.md, session 8)."""
    best = best_runs(runs)
    dense = reference_dense(best)
    if dense is None:
        return "(no dense run yet)"
    dense_runs = [each for r in runs if r["family"] == dense["family"] and r["lr"] == dense["lr"]
                  for each in [r, *r["repeats"]]]

    def ppl(run, name):
        """Headline-routing perplexity of `run` on `name` ("val": the validation windows; else a held-out set)."""
        if name == "val":
            return run["eval"][headline_routing(run)]["ppl"]
        found = [e for e in run.get("other", {}).get(name, []) if e.get("routing") == headline_routing(run)]
        return found[0]["ppl"] if found else None

    sets = ["val"] + sorted({name for r in best.values() for name in r.get("other", {})
                             if name not in ("leak", "val_books")})
    references = {name: [v for v in (ppl(r, name) for r in dense_runs) if v is not None] for name in sets}
    header = [f"{name}: ppl (vs dense mean; range vs single dense runs)" for name in sets]
    rows = ["| family | " + " | ".join(header) + " |", "|---" * (len(sets) + 1) + "|"]
    cells = []
    for name in sets:
        values = references[name]
        cells.append(f"{sum(values) / len(values):.2f} over {len(values)} runs [{min(values):.2f}, {max(values):.2f}]"
                     if values else "")
    rows.append(f"| dense (lr {dense['lr']:g}, every seed and repeat) | " + " | ".join(cells) + " |")
    for family_name, run in best.items():
        if run["family"] == dense["family"] or shape_of(run):  # other shapes: not against this shape's dense
            continue
        cells = []
        for name in sets:
            mine, values = ppl(run, name), references[name]
            if mine is None or not values:
                cells.append("")
                continue
            changes = [mine / v - 1 for v in values]
            cells.append(f"{mine:.2f} ({mine / (sum(values) / len(values)) - 1:+.1%}; {min(changes):+.1%} to "
                         f"{max(changes):+.1%})")
        rows.append(f"| {family_name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def per_book_table(runs: list[dict], whole_split: bool = False) -> str:
    """Every family at its best rate, book by book: its perplexity on each book's windows (headline routing) and
    the change against the best dense on the same windows. whole_split: from the runs' `val_books` evaluation
    (`run_queue.py --val-books`, every book of the split), else from the validation windows (the books the first
    windows reach)."""
    best = best_runs(runs)
    dense = reference_dense(best)

    def evaluation(run):
        if not whole_split:
            return run["eval"][headline_routing(run)]
        found = [e for e in run.get("other", {}).get("val_books", []) if e.get("routing") == headline_routing(run)]
        return found[0] if found else None

    reference = None if dense is None else evaluation(dense)
    if reference is None or "window_documents" not in reference:
        return "(no dense run with per-window results yet)"
    families = {name: evaluation(run) for name, run in best.items() if not shape_of(run)}  # the Tiny shape
    families = {name: e for name, e in families.items()
                if e is not None and e.get("window_documents") == reference["window_documents"]}
    rows = ["| book | windows | " + " | ".join(families) + " |", "|---" * (len(families) + 2) + "|"]
    for document, label in enumerate(reference["document_labels"]):
        picked = [i for i, d in enumerate(reference["window_documents"]) if d == document]
        if not picked:
            continue
        base = sum(reference["window_losses"][i] for i in picked)
        cells = []
        for name, mine in families.items():
            losses = sum(mine["window_losses"][i] for i in picked)
            ppl = math.exp(losses / len(picked))
            cells.append(f"{ppl:.1f}" if best[name] is dense else
                         f"{ppl:.1f} ({math.exp((losses - base) / len(picked)) - 1:+.0%})")
        rows.append(f"| {label.strip()[:40]} | {len(picked)} | " + " | ".join(cells) + " |")
    where = ("the whole validation split" if whole_split else
             "the validation windows (the first 512 of the split, so only the books they reach)")
    return "\n".join(rows) + (f"\n\nPerplexity per book over {where}, headline routing (causal for MoSA); in "
                              "brackets the change against the best dense model on the same windows. Families "
                              "without that evaluation are left out.")


def seeds_table(runs: list[dict]) -> str:
    """Families trained at one rate with several seeds: each seed's headline perplexity and, seed by seed, the
    paired difference to the reference dense model of the same seed (the spread between training runs, which the
    window bootstrap of one pair does not see)."""
    best = best_runs(runs)
    rows = ["| family | lr | seed | val ppl (headline routing) | vs dense of the same seed, shape and its best rate "
            "(paired, 95% interval) |", "|---|---|---|---|---|"]
    for name, lr in dict.fromkeys((r["family"], r["lr"]) for r in runs if r["seed"]):
        seeded = sorted((r for r in runs if r["family"] == name and r["lr"] == lr), key=lambda r: r["seed"])
        for run in seeded:
            mine = run["eval"][headline_routing(run)]
            reference = reference_dense(best, run)
            dense = None if reference is None else next(
                (r for r in runs if r["family"] == reference["family"] and r["lr"] == reference["lr"]
                 and r["seed"] == run["seed"]), None)
            versus = "-" if dense is None or run["attention"] == "dense" else ratio_cell(mine, dense["eval"]["topk"])
            rows.append(f"| {name} | {lr:g} | {run['seed']} | {mine['ppl']:.2f} | {versus} |")
    return "\n".join(rows) if len(rows) > 2 else "(no second seed yet)"


def leak_table(runs: list[dict]) -> str:
    """`noise` is the mean |change| between two runs of the same windows with nothing replaced: on a GPU the op's
    fp32 atomics make it nonzero, and a change of that size is not a leak."""
    rows = ["| run | routing | replacement | loss change before the cut (nats/token, 95% interval) | mean abs change "
            "| noise (same input twice) | windows changed |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        for measurement in run.get("other", {}).get("leak", []):
            if "error" in measurement:
                error = " ".join(measurement["error"].split())[-80:]  # one table row
                rows.append(f"| {run['name']} | - | - | failed: {error} | - | - | - |")
                continue
            low, high = measurement["interval"]
            rows.append(f"| {run['name']} | {measurement['routing']} | {measurement['replacement']} | "
                        f"{measurement['mean_change']:+.5f} [{low:+.5f}, {high:+.5f}] | "
                        f"{measurement['mean_abs_change']:.5f} | {measurement['noise']:.5f} | "
                        f"{measurement['changed_share']:.0%} |")
    return "\n".join(rows) if len(rows) > 2 else "(no leak measurements yet)"


def equal_time_table(runs: list[dict]) -> str:
    """Each family's best run against dense given the same training time: the dense tokens that time buys, at the
    speed of the fastest dense run of the same model shape on the same kind of GPU."""
    best = best_runs(runs)
    dense = [r for r in runs if r["attention"] == "dense"]
    if not dense:
        return "(no dense run yet)"
    rows = ["| family | GPU | training time | dense tokens in that time | dense run at about those tokens |",
            "|---|---|---|---|---|"]
    for name, run in best.items():
        if run["attention"] == "dense":
            continue
        seconds = run["summary"]["tokens"] / run["summary"]["tokens_per_s"]
        same_shape = [r for r in dense if shape_of(r) == shape_of(run)]
        same_gpu = [r["summary"]["tokens_per_s"] for r in same_shape if r["device"] == run["device"]]
        if not same_gpu:  # speeds are compared on one kind of GPU only
            rows.append(f"| {name} | {run['device']} | {seconds:.0f} s | no dense run on this GPU yet | - |")
            continue
        tokens = seconds * max(same_gpu)
        near = [r for r in same_shape if abs(r["summary"]["tokens"] / tokens - 1) < 0.1]
        found = ", ".join(f"{r['name']}: {r['eval']['topk']['ppl']:.2f}" for r in near) or "not run yet"
        rows.append(f"| {name} | {run['device']} | {seconds:.0f} s | {tokens / 1e6:.1f}M | {found} |")
    return "\n".join(rows)


def equal_tokens_table(runs: list[dict]) -> str:
    """Issue 15 item 6: every sparse family at its best rate (seed 0) beside the best dense run of the same tokens
    and model shape, paired on the same validation windows: how the gap changes with training tokens and passes,
    and on the smaller shape."""
    best = best_runs(runs).values()
    dense = {(r["summary"]["tokens"], shape_of(r)): r for r in best if r["attention"] == "dense"}
    rows = ["| family | tokens | passes | best dense (lr): ppl | family's best lr | ppl, causal (top-k) | causal vs "
            "dense of the same tokens and shape (paired, 95% interval) |", "|---|---|---|---|---|---|---|"]
    for run in best:
        match = dense.get((run["summary"]["tokens"], shape_of(run)))
        if run["attention"] == "dense" or match is None or "causal" not in run["eval"]:
            continue
        rows.append(f"| {run['family']} | {run['summary']['tokens'] / 1e6:.0f}M | {passes(run)} | "
                    f"({match['lr']:g}) {match['eval']['topk']['ppl']:.2f} | {run['lr']:g} | "
                    f"{run['eval']['causal']['ppl']:.2f} ({run['eval']['topk']['ppl']:.2f}) | "
                    f"{ratio_cell(run['eval']['causal'], match['eval']['topk'])} |")
    return "\n".join(rows)


def plot_sweep(runs: list[dict], out: Path) -> Path | None:
    """Validation loss against learning rate for every family swept over at least two rates (seed 0), headline
    routing, bootstrap intervals over the validation windows."""
    from torch_mosa.train.plots import plot_loss_vs_lr

    seed0 = [r for r in runs if r["lr"] is not None and not r["seed"]]
    swept = {f for f in {r["family"] for r in seed0} if len({r["lr"] for r in seed0 if r["family"] == f}) > 1}
    points = [{"family": (series(r, short=True) if r["attention"] == "dense"
                          else f"{series(r, short=True)} ({headline_routing(r)})"),
               "lr": r["lr"],
               "val_loss": r["eval"][headline_routing(r)]["loss"],
               "val_loss_interval": bootstrap_interval(r["eval"][headline_routing(r)]["window_losses"])
               if "window_losses" in r["eval"][headline_routing(r)] else None}
              for r in seed0 if r["family"] in swept]
    return plot_loss_vs_lr(points, out / "reproduction_v2_lr_sweep.png") if points else None


def plot_tokens(runs: list[dict], out: Path) -> Path | None:
    """Issue 15 item 6 as a picture: headline-routing validation perplexity against training tokens for dense and
    causal-trained MoSA 64, each (series, tokens) at its best rate, seed 0, with the bootstrap 95% interval of each
    perplexity over its validation windows (the paired differences in the tables are far tighter)."""
    from torch_mosa.train.plots import plot_ppl_vs_tokens

    points = []
    for run in best_runs(runs).values():
        name = series(run, short=True)
        if not (name.startswith(KINDS["dense"]) or name.startswith("MoSA (sparsity 64), causal-trained")):
            continue
        evaluation = run["eval"][headline_routing(run)]
        interval = (tuple(math.exp(v) for v in bootstrap_interval(evaluation["window_losses"]))
                    if "window_losses" in evaluation else None)
        points.append({"series": name, "tokens": run["summary"]["tokens"], "ppl": evaluation["ppl"],
                       "ppl_interval": interval})
    return plot_ppl_vs_tokens(points, out / "reproduction_v2_tokens.png") if points else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--plots", type=Path, default=ROOT / "docs")
    parser.add_argument("--corpus-tokens", type=int, default=54_716_632,
                        help="training tokens of the corpus, for runs that did not record it (default: the Gutenberg "
                             "preparation every run so far used, meta.json num_tokens.train)")
    args = parser.parse_args()
    global CORPUS_TOKENS
    CORPUS_TOKENS = args.corpus_tokens
    runs = load_runs(args.results)
    if not runs:
        raise SystemExit(f"no issue15-*-results-*.jsonl[.xz] in {args.results}")
    sections = [("Learning-rate sweep", sweep_table(runs)), ("Each family at its best rate", headline_table(runs)),
                ("Seeds", seeds_table(runs)), ("Per validation book", per_book_table(runs)),
                ("Per validation book, whole split", per_book_table(runs, whole_split=True)),
                ("Held-out text", heldout_table(runs)),
                ("Against the spread of the dense runs", dense_spread_table(runs)),
                ("The leak of top-k routing", leak_table(runs)),
                ("Equal training time", equal_time_table(runs)),
                ("Equal tokens, more tokens", equal_tokens_table(runs))]
    for title, table in sections:
        print(f"### {title}\n\n{table}\n")
    for plot in (plot_sweep(runs, args.plots), plot_tokens(runs, args.plots)):
        if plot is not None:
            print(f"(plot: {plot.relative_to(ROOT) if plot.is_relative_to(ROOT) else plot})")


if __name__ == "__main__":
    main()
