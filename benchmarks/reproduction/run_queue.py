"""Run a queue of reproduction runs (issues 7 and 15) on one GPU: `mosa train` then `mosa eval`, one after the other.

Every command is printed and recorded, so each row of docs/reproduction.md can be repeated by hand. Results go to
OUT/results-<tag>.jsonl (one line per finished run) and OUT/runs-<tag>.tar.gz (config, metrics, summary of every
finished run), rewritten after each run so that a queue cut short still returns what it finished.

Run spec: NAME:ATTENTION:SPARSITY[:SEED[:NUM_SPARSE_HEADS]][:KEY=VALUE...], e.g. dense:dense:1,
mosa64:mosa:64, t2:mosa:32:0:17, dense-lr2e-3:dense:1:lr=2e-3, c64:mosa:64:routing=causal:lr=1e-3. Keys:
  lr             peak learning rate (`mosa train --lr`; default: the queue's --lr)
  routing        topk | causal: the training routing (causal training, issue 11)
  fixed_offsets  shared | per_head (fixed sparse heads, `--fixed-offsets`)
  tokens         training tokens of this run (default: the queue's --tokens)
  num_layers, hidden_size, ffn_size, head_dim, num_heads   a smaller shape than the preset's (the `mosa train`
                 options of the same names; docs/reproduction.md has the one issue 15 suggests)
Evaluation: top-k and causal routing, per book too (`--per-document`, with every window's loss for paired
comparisons later). A top-k-trained model is calibrated first (`--calibrate-batches 4`, on its training split); a
causal-trained model keeps the thresholds it trained. Under causal routing each MoSA head keeps at most
--eval-capacity-factor x T/sparsity tokens per window (`--causal-capacity`; joins beyond it are dropped and
reported): without a capacity the causal forward runs every head at full width, about 100x slower
(docs/causal_inference.md, "Evaluation speed"). The checkpoints stay on the GPU machine, so whatever else a run is
measured on happens in the same queue: `--heldout NAME=DIR` evaluates it on other prepared data (all of DIR's
train split, e.g. author-disjoint books or WikiText-2 tokenized with the run's tokenizer) and `--leak` runs
`mosa leak` (future replaced by another document and by the same document far away); `--val-books` evaluates the
whole validation split (every book, 2.2M tokens on Gutenberg) under the headline routing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

OPTION_FLAGS = {"lr": "--lr", "routing": "--routing", "fixed_offsets": "--fixed-offsets",
                "num_layers": "--num-layers", "hidden_size": "--hidden-size", "ffn_size": "--ffn-size",
                "head_dim": "--head-dim", "num_heads": "--num-heads"}


def parse_spec(spec: str) -> dict:
    parts = spec.split(":")
    positional = [p for p in parts if "=" not in p]
    options = dict(p.split("=", 1) for p in parts if "=" in p)
    if not 3 <= len(positional) <= 5 or parts[:len(positional)] != positional:
        raise SystemExit(f"bad run spec {spec!r}: NAME:ATTENTION:SPARSITY[:SEED[:NUM_SPARSE_HEADS]][:KEY=VALUE...]")
    unknown = set(options) - set(OPTION_FLAGS) - {"tokens"}
    if unknown:
        raise SystemExit(f"bad run spec {spec!r}: unknown keys {sorted(unknown)}; allowed: "
                         f"{sorted([*OPTION_FLAGS, 'tokens'])}")
    if options.get("routing", "topk") not in ("topk", "causal"):
        raise SystemExit(f"bad run spec {spec!r}: routing must be topk or causal, got {options['routing']!r}")
    name, attention, sparsity = positional[0], positional[1], int(positional[2])
    seed = int(positional[3]) if len(positional) > 3 else 0
    heads = int(positional[4]) if len(positional) > 4 else None
    return {"name": name, "attention": attention, "sparsity": sparsity, "seed": seed, "num_sparse_heads": heads,
            "options": options}


def commands(run: dict, args) -> tuple[list[str], list[str]]:
    options = dict(run["options"])
    tokens = int(float(options.pop("tokens", args.tokens)))
    if args.lr is not None:
        options.setdefault("lr", args.lr)
    steps = tokens // (args.batch_size * args.seq_len)
    warmup = max(1, round(0.04 * steps))
    out = str(Path(args.runs) / run["name"])
    train = ["mosa", "train", "--preset", args.preset, "--attention", run["attention"], "--data", args.data,
             "--steps", str(steps), "--batch-size", str(args.batch_size), "--warmup-steps", str(warmup),
             "--eval-interval", str(max(1, steps // 10)), "--eval-batches", "4", "--checkpoint-interval", "0",
             "--seed", str(run["seed"]), "--out", out, "--no-progress"]
    if run["attention"] != "dense":
        train += ["--sparsity", str(run["sparsity"])]
    if run["num_sparse_heads"] is not None:
        train += ["--num-sparse-heads", str(run["num_sparse_heads"])]
    for key, value in options.items():
        train += [OPTION_FLAGS[key], str(value)]
    # Dense attention routes nothing (its causal and top-k forwards are one computation) and Routing attention has
    # no causal rule: both are evaluated once, under top-k. Sparse heads are evaluated under both on the
    # validation windows, and only under causal routing (the report's headline) on the held-out sets, whose
    # 2.5M tokens took most of a run's extra time
    routed = run["attention"] not in ("dense", "routing")
    calibrate = ["--calibrate-batches", "4"] if routed and options.get("routing", "topk") == "topk" else []
    routing = ["--routing", "topk", "causal", *calibrate] if routed else ["--routing", "topk"]
    headline = ["--routing", "causal", *calibrate] if routed else ["--routing", "topk"]
    capacity = []
    if run["attention"] in ("mosa", "pure_mosa") and args.eval_capacity_factor > 0:
        capacity = ["--causal-capacity", str(math.ceil(args.eval_capacity_factor * args.seq_len / run["sparsity"]))]
    common = ["--batch-size", str(args.eval_batch_size), "--device", args.device, "--json"]
    if args.eval_windows % args.eval_batch_size:
        raise SystemExit(f"--eval-windows ({args.eval_windows}) must be a multiple of --eval-batch-size "
                         f"({args.eval_batch_size})")
    batches = args.eval_windows // args.eval_batch_size
    evaluate = {"val": ["mosa", "eval", out, "--max-batches", str(batches), "--decode-tokens", "64",
                        "--per-document", *common, *routing, *capacity]}
    for name, directory in args.heldout:
        evaluate[name] = ["mosa", "eval", out, "--data", directory, "--split", "train", "--full", "--per-document",
                          *common, *headline, *capacity]
    if args.val_books:  # every book of the validation split, not only those the first windows reach
        evaluate["val_books"] = ["mosa", "eval", out, "--split", "val", "--full", "--per-document", *common,
                                 *headline, *capacity]
    if args.leak:
        evaluate["leak"] = ["mosa", "leak", out, "--replacement", "other", "far", *common, *routing]
    return train, evaluate


def run_command(argv: list[str], log) -> str:
    print("$ " + " ".join(argv), file=log, flush=True)
    done = subprocess.run([sys.executable, "-m", "torch_mosa.cli", *argv[1:]], capture_output=True, text=True)
    log.write(done.stdout[-4000:] + done.stderr[-4000:])
    log.flush()
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: {' '.join(argv)}\n{done.stderr[-2000:]}")
    return done.stdout


def _json_lines(stdout: str) -> list:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_spec", nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--runs", required=True, help="directory of the run directories")
    parser.add_argument("--out", required=True, help="where results and the tarball go")
    parser.add_argument("--tag", default="0")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=1024, help="the preset's sequence length")
    parser.add_argument("--device", default="cuda", help="device of the evaluation (training picks CUDA itself)")
    parser.add_argument("--tokens", type=int, default=40_000_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=512,
                        help="validation windows of the headline evaluation (the study's runs share the first 512)")
    parser.add_argument("--eval-batch-size", type=int, default=8,
                        help="windows per batch of every evaluation (a larger batch may evaluate faster: unmeasured)")
    parser.add_argument("--lr", default=None, help="peak learning rate of runs whose spec gives none (default: "
                                                   "mosa train's)")
    parser.add_argument("--heldout", action="append", default=[], type=lambda text: tuple(text.split("=", 1)),
                        metavar="NAME=DIR", help="also evaluate every run on DIR's train split (repeatable)")
    parser.add_argument("--leak", action="store_true", help="also run `mosa leak` on every run")
    parser.add_argument("--val-books", action="store_true",
                        help="also evaluate the whole validation split, per book, under the headline routing")
    parser.add_argument("--eval-capacity-factor", type=float, default=2.0,
                        help="causal evaluation keeps at most this x T/sparsity tokens per MoSA head (0: no cap)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / f"results-{args.tag}.jsonl"
    finished = []
    with open(out / f"log-{args.tag}.txt", "a") as log:
        for run in map(parse_spec, args.runs_spec):
            train, evaluate = commands(run, args)
            start = time.time()
            try:
                run_command(train, log)
                measured = {"val": _json_lines(run_command(evaluate["val"], log))}
            except RuntimeError as error:
                print(f"FAILED {run['name']}: {error}", file=log, flush=True)
                continue
            for name, argv in evaluate.items():  # a failed extra measurement is recorded, the run is kept
                if name != "val":
                    try:
                        measured[name] = _json_lines(run_command(argv, log))
                    except RuntimeError as error:
                        print(f"FAILED {run['name']} {name}: {error}", file=log, flush=True)
                        measured[name] = [{"error": str(error)[-2000:]}]
            run_dir = Path(args.runs) / run["name"]
            summary = json.loads((run_dir / "summary.json").read_text())
            record = {**run, "train_command": " ".join(train), "eval_command": " ".join(evaluate["val"]),
                      "corpus_tokens": _corpus_tokens(args.data),
                      "summary": summary, "eval": measured.pop("val"), "seconds": time.time() - start,
                      "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": _device_name(),
                      "other_commands": {name: " ".join(argv) for name, argv in evaluate.items() if name != "val"},
                      "other": measured}
            with open(results, "a") as f:
                f.write(json.dumps(record) + "\n")
            finished.append(run_dir)
            with tarfile.open(out / f"runs-{args.tag}.tar.gz", "w:gz") as tar:
                for directory in finished:
                    for name in ("config.json", "metrics.csv", "summary.json"):
                        tar.add(directory / name, arcname=f"{directory.name}/{name}")
            print(f"done {run['name']} in {time.time() - start:.0f} s", file=log, flush=True)



def _corpus_tokens(data: str) -> int | None:
    """Training tokens of the prepared data (its meta.json), so that a report can say how many passes a run made."""
    try:
        return int(json.loads((Path(data) / "meta.json").read_text())["num_tokens"]["train"])
    except (OSError, KeyError, ValueError):
        return None


def _device_name() -> str:
    """The GPU this queue runs on (speeds are compared only between runs on the same kind)."""
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i",
                                os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]], capture_output=True,
                               text=True)
    except OSError:  # no nvidia-smi
        return "unknown GPU"
    return query.stdout.strip() or "unknown GPU"

if __name__ == "__main__":
    main()
