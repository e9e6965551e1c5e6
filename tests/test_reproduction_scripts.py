"""The study's queue and report scripts (benchmarks/reproduction/): the commands a run spec becomes, and the
report's choice of baseline, seeds and per-book tables, on synthetic results."""

import importlib.util
import json
import lzma
import math
from argparse import Namespace
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduction"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def queue_args(**overrides):
    args = dict(tokens=40_000_000, lr=None, batch_size=64, seq_len=1024, runs="/tmp/runs", preset="tiny",
                data="/tmp/data", eval_windows=512, eval_batch_size=8, device="cuda", heldout=[], leak=False,
                val_books=False,
                eval_capacity_factor=2.0)
    return Namespace(**{**args, **overrides})


@pytest.mark.parametrize("spec,routing", [("d:dense:1:lr=1e-3", ["topk"]),
                                          ("m:mosa:64:lr=1e-3", ["causal", "--calibrate-batches", "4"]),
                                          ("c:mosa:64:routing=causal", ["causal"])])
def test_val_books_evaluates_the_whole_split_under_the_headline_routing(spec, routing):
    run_queue = load("run_queue")
    _, evaluate = run_queue.commands(run_queue.parse_spec(spec), queue_args(val_books=True))
    argv = evaluate["val_books"]
    assert argv[argv.index("--split") + 1] == "val" and "--full" in argv and "--per-document" in argv
    assert argv[argv.index("--routing") + 1:argv.index("--routing") + 1 + len(routing)] == routing
    assert "val_books" not in run_queue.commands(run_queue.parse_spec(spec), queue_args())[1]


@pytest.mark.parametrize("batch_size", [8, 32])
def test_the_validation_windows_do_not_depend_on_the_batch_size(batch_size):
    run_queue = load("run_queue")
    _, evaluate = run_queue.commands(run_queue.parse_spec("d:dense:1"), queue_args(eval_batch_size=batch_size))
    argv = evaluate["val"]
    assert int(argv[argv.index("--max-batches") + 1]) * int(argv[argv.index("--batch-size") + 1]) == 512
    with pytest.raises(SystemExit, match="multiple"):
        run_queue.commands(run_queue.parse_spec("d:dense:1"), queue_args(eval_batch_size=7))


def fake_run(name, attention, lr, seed, losses, documents, tokens=None, val_books=None, sparsity=1, options=None):
    """One results line as run_queue.py writes it, with per-window losses (options: more run spec keys)."""
    evaluation = {"loss": sum(losses) / len(losses), "ppl": math.exp(sum(losses) / len(losses)),
                  "window_losses": losses, "window_documents": documents, "document_labels": ["BOOK A", "BOOK B"]}
    routings = ["topk"] if attention == "dense" else ["topk", "causal"]
    options = {"lr": str(lr)} | ({"tokens": str(tokens)} if tokens else {}) | (options or {})
    other = {}
    if val_books is not None:
        other["val_books"] = [{**evaluation, "routing": routings[-1], "window_losses": val_books,
                               "window_documents": [0, 1, 1]}]
    return {"name": name, "attention": attention, "sparsity": sparsity, "seed": seed, "num_sparse_heads": None,
            "options": options, "train_command": f"mosa train --lr {lr}", "device": "GPU",
            "summary": {"tokens": tokens or 40_000_000, "tokens_per_s": 1e6, "params": 1e6},
            "eval": [{**evaluation, "routing": r} for r in routings], "other": other}


def write_results(tmp_path, runs):
    path = tmp_path / "issue15-call1-results-0.jsonl"
    path.write_text("".join(json.dumps(run) + "\n" for run in runs))
    return path.parent


def test_report_compares_with_the_40m_token_dense_and_pairs_seeds(tmp_path):
    report = load("make_report_v2")
    runs = report.load_runs(write_results(tmp_path, [
        fake_run("d1", "dense", 1e-3, 0, [4.0, 4.2, 4.4], [0, 0, 1], val_books=[4.0, 4.2, 4.4]),
        fake_run("d2", "dense", 2e-3, 0, [4.1, 4.3, 4.5], [0, 0, 1]),
        fake_run("d1s1", "dense", 1e-3, 1, [4.2, 4.4, 4.6], [0, 0, 1]),
        fake_run("long", "dense", 1e-3, 0, [3.0, 3.0, 3.0], [0, 0, 1], tokens=80e6),  # more tokens: never the baseline
        fake_run("m", "mosa", 1e-3, 0, [3.8, 4.0, 4.2], [0, 0, 1], val_books=[3.9, 4.1, 4.3], sparsity=64),
        fake_run("ms1", "mosa", 1e-3, 1, [3.8, 4.0, 4.2], [0, 0, 1], sparsity=64),
    ]))
    best = report.best_runs(runs)
    assert report.reference_dense(best)["name"] == "d1"
    headline = report.headline_table(runs)
    assert "| dense | 0.001 |" in headline and "| dense, 80M tokens | 0.001 |" in headline
    seeds = report.seeds_table(runs)  # seed 1 of MoSA is paired with seed 1 of dense at dense's best rate
    assert f"| 1 | {math.exp(4.0):.2f} | {math.exp(-0.4) - 1:+.1%}" in seeds
    per_book = {line.split(" | ")[0]: line for line in report.per_book_table(runs).splitlines()}
    assert per_book["| BOOK A"].startswith(f"| BOOK A | 2 | {math.exp(4.1):.1f} | ")
    assert per_book["| BOOK A"].endswith(f" | {math.exp(3.9):.1f} ({math.exp(-0.2) - 1:+.0%}) |")
    whole = report.per_book_table(runs, whole_split=True)
    assert f"| BOOK B | 2 | {math.exp(4.3):.1f} | {math.exp(4.2):.1f} ({math.exp(-0.1) - 1:+.0%})" in whole
    assert "80M" not in whole  # families without a whole-split evaluation are left out


def test_report_compares_each_shape_with_its_own_dense(tmp_path):
    """A smaller model shape is compared with the dense of that shape (at its best rate, whatever the tokens), in
    the headline and equal-tokens tables, never with the Tiny dense."""
    report = load("make_report_v2")
    small = {"num_layers": "4", "hidden_size": "256"}
    small_dense = fake_run("sd1", "dense", 1e-3, 0, [5.0, 5.0, 5.0], [0, 0, 1], tokens=50e6, options=small)
    small_dense["summary"]["tokens_per_s"] = 4e6  # the small shape trains faster: never the Tiny's equal-time speed
    runs = report.load_runs(write_results(tmp_path, [
        fake_run("d1", "dense", 1e-3, 0, [4.0, 4.2, 4.4], [0, 0, 1]),
        fake_run("m", "mosa", 1e-3, 0, [3.8, 4.0, 4.2], [0, 0, 1], sparsity=64),
        small_dense,
        fake_run("sd2", "dense", 2e-3, 0, [4.5, 4.5, 4.5], [0, 0, 1], tokens=50e6, options=small),
        fake_run("sm", "mosa", 2e-3, 0, [4.0, 4.0, 4.0], [0, 0, 1], tokens=50e6, options=small, sparsity=64),
    ]))
    equal_time = {line.split(" | ")[0]: line for line in report.equal_time_table(runs).splitlines()}
    assert "| 40 s | 40.0M | d1: " in equal_time["| MoSA (sparsity 64)"]  # at the Tiny dense's 1e6 tokens/s
    small_row = next(line for name, line in equal_time.items() if "num_layers=4" in name)
    assert "| 50 s | 200.0M | not run yet |" in small_row  # at the small dense's 4e6 tokens/s
    best = report.best_runs(runs)
    assert report.reference_dense(best)["name"] == "d1"
    assert report.reference_dense(best, best_of(best, "sm"))["name"] == "sd2"
    equal_tokens = report.equal_tokens_table(runs)
    small_row = [line for line in equal_tokens.splitlines() if "num_layers=4" in line]
    assert len(small_row) == 1 and f"| (0.002) {math.exp(4.5):.2f} | 0.002 |" in small_row[0]
    assert f"{math.exp(-0.5) - 1:+.1%}" in small_row[0]
    headline = [line for line in report.headline_table(runs).splitlines() if line.startswith("| MoSA") and
                "num_layers=4" in line]
    assert f"| {math.exp(-0.5) - 1:+.1%}" in headline[0]


def best_of(best, name):
    return next(run for run in best.values() if run["name"] == name)


def test_dense_spread_table_compares_with_every_dense_run(tmp_path):
    """Against the mean of the reference dense configuration's runs, every seed and every repeat (not other rates
    or token budgets), with the range of changes against each dense run."""
    report = load("make_report_v2")
    write_results(tmp_path, [fake_run("d1", "dense", 1e-3, 0, [4.1, 4.1, 4.1], [0, 0, 1])])  # call 1: repeated later
    later = tmp_path / "issue15-call2-results-0.jsonl.xz"  # committed results are xz-compressed since session 12
    later.write_bytes(lzma.compress("".join(json.dumps(run) + "\n" for run in [
        fake_run("d1", "dense", 1e-3, 0, [4.0, 4.0, 4.0], [0, 0, 1]),
        fake_run("d1s1", "dense", 1e-3, 1, [4.2, 4.2, 4.2], [0, 0, 1]),
        fake_run("d2", "dense", 2e-3, 0, [5.0, 5.0, 5.0], [0, 0, 1]),
        fake_run("long", "dense", 1e-3, 0, [3.0, 3.0, 3.0], [0, 0, 1], tokens=80e6),
        fake_run("m", "mosa", 1e-3, 0, [3.9, 3.9, 3.9], [0, 0, 1], sparsity=64),
    ]).encode()))
    runs = report.load_runs(tmp_path)
    assert report.reference_dense(report.best_runs(runs))["eval"]["topk"]["loss"] == pytest.approx(4.0)  # the later
    table = report.dense_spread_table(runs)
    dense = [math.exp(4.0), math.exp(4.2), math.exp(4.1)]  # seed 0, seed 1, seed 0's earlier repeat
    mean = sum(dense) / 3
    assert f"| dense (lr 0.001, every seed and repeat) | {mean:.2f} over 3 runs [{min(dense):.2f}, {max(dense):.2f}] |" \
        in table
    mosa = math.exp(3.9)
    assert (f"| MoSA (sparsity 64) | {mosa:.2f} ({mosa / mean - 1:+.1%}; {math.exp(-0.3) - 1:+.1%} to "
            f"{math.exp(-0.1) - 1:+.1%}) |") in table
