"""The benchmark's options and run, shared by `python -m torch_mosa.bench` and `mosa bench`.

They live in the bench package so that its own entry point does not depend on the command line (the CLI imports
the library, never the reverse).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from torch_mosa.bench.cases import (CASES, DEFAULT_TRAIN_MODEL_IDS, TRAIN_MODEL_IDS, TRAIN_MODELS, run_cases,
                                    train_step_tokens_per_second)
from torch_mosa.bench.report import markdown_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", nargs="*", default=["A", "B", "C", "D"],
                   help="any of A B C D (default all; none: only the training steps)")
    p.add_argument("--paths", nargs="+", default=["dense", "reference", "fast"],
                   help="any of dense reference fast (default all)")
    p.add_argument("--reference-max-seq-len", type=int, default=131072,
                   help="skip the reference path above this T (case D); the table says 'not run'")
    p.add_argument("--compile-layers", action="store_true",
                   help="time the layer cases through torch.compile (dense and MoSA alike), without the eager "
                        "step's Python and launch overhead")
    p.add_argument("--cuda-graph-steps", action="store_true",
                   help="time every layer forward+backward and every training step (--train-step) as a CUDA graph "
                        "replay, dense and MoSA alike: no host launch overhead in the time (small batches and case "
                        "D are bound by the host otherwise)")
    p.add_argument("--train-step", action="store_true",
                   help="also time whole Tiny training steps (compiled, bf16 autocast, fused AdamW): dense, MoSA "
                        "sparsity 64 and 16, and the 4 + 17 sparsity-32 model")
    p.add_argument("--train-models", nargs="+", choices=list(TRAIN_MODEL_IDS), default=list(DEFAULT_TRAIN_MODEL_IDS),
                   help="with --train-step, these models (default: issue 10's table, all but s4); dense is always "
                        "timed, as the ratios' base")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--no-compile", action="store_true", help="time the training steps without torch.compile")
    p.add_argument("--train-documents", type=int, default=0, metavar="N",
                   help="with --train-step, also time each model on rows packed with N documents of random lengths "
                        "(per-document routing and masks)")
    p.add_argument("--decode", action="store_true",
                   help="time greedy decoding instead of the layer cases: the yardstick (a plain dense GPT with a "
                        "static KV cache), torch-mosa dense, MoSA 4+17 s32 and MoSA IsoFLOP s64 (tiny, bf16)")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 32], help="batch sizes of --decode")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens of --decode")
    p.add_argument("--new-tokens", type=int, default=128, help="timed new tokens of --decode")
    p.add_argument("--cuda-graphs", action="store_true", help="with --decode, also time every decode step replayed "
                                                              "as a CUDA graph")
    p.add_argument("--compile-decode", action="store_true",
                   help="with --decode, also time every decode step compiled by Inductor and replayed as a CUDA graph "
                        "(the yardstick compiled too)")
    p.add_argument("--no-eager", action="store_true", help="with --decode, skip the eager rows")
    p.add_argument("--reference-decode", action="store_true",
                   help="with --decode, also time the sparse models' decode step as the plain-PyTorch composition "
                        "instead of the fused kernels (the A/B of ops/decode)")
    p.add_argument("--eval-routing", action="store_true",
                   help="time evaluation forwards of the Tiny IsoFLOP model instead of the layer cases: top-k "
                        "routing beside causal routing with and without a capacity per head (B=--eval-batch)")
    p.add_argument("--eval-batch", type=int, default=16, help="batch of --eval-routing (windows of max_seq_len)")
    p.add_argument("--out", default=None, help="write the markdown table here")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise ValueError("mosa bench needs a CUDA GPU; none is available")
    if args.decode:
        return run_decode(args)
    if args.eval_routing:
        return run_eval_routing(args)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        raise ValueError(f"--cases must be among {sorted(CASES)}, got {unknown}")
    rows = run_cases(args.cases, tuple(args.paths), args.reference_max_seq_len, compile_layers=args.compile_layers,
                     cuda_graphs=args.cuda_graph_steps)
    train_rows = []
    if args.train_step:
        for name in train_model_names(args.train_models):
            model_kwargs = TRAIN_MODELS[name]
            tokens_per_s, mib = train_step_tokens_per_second(model_kwargs, batch=args.train_batch,
                                                             compile_model=not args.no_compile,
                                                             cuda_graph=args.cuda_graph_steps)
            train_rows.append((name, args.train_batch, tokens_per_s, mib))
            print(f"train step {name}: {tokens_per_s:,.0f} tokens/s, {mib:.0f} MiB", flush=True)
            torch.cuda.empty_cache()  # the next model starts from a clean cache
            if args.train_documents:
                packed_name = f"{name}, packed {args.train_documents} documents/row"
                tokens_per_s, mib = train_step_tokens_per_second(model_kwargs, batch=args.train_batch,
                                                                 compile_model=not args.no_compile,
                                                                 documents=args.train_documents,
                                                                 cuda_graph=args.cuda_graph_steps)
                train_rows.append((packed_name, args.train_batch, tokens_per_s, mib))
                print(f"train step {packed_name}: {tokens_per_s:,.0f} tokens/s, {mib:.0f} MiB", flush=True)
                torch.cuda.empty_cache()
    notes = ["layers compiled with torch.compile (each path afresh), timed after compilation"] \
        if args.compile_layers and rows else []
    if args.cuda_graph_steps:
        notes.append("every timed step (layer forward+backward; training step with its optimizer) captured once as a "
                     "CUDA graph after warm-up and replayed, dense and MoSA alike; peak memory of the layers from "
                     "one eager step")
    return _emit(markdown_report(rows, train_rows, command=_command(), notes=notes), args.out)


def train_model_names(ids) -> list[str]:
    """`--train-models` ids -> TRAIN_MODELS names, dense first (the training table's ratios are to it)."""
    return [TRAIN_MODEL_IDS[i] for i in dict.fromkeys(["dense", *ids])]


def _command() -> str:
    return " ".join(["python -m torch_mosa.bench", *sys.argv[1:]])


def _header(title: str) -> list[str]:
    """A table's heading: title, date, GPU, versions and the exact command."""
    from torch_mosa.bench.report import environment

    env = environment()
    return [title, "", f"- date: {env['date']}", f"- GPU: {env['gpu']}",
            f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}", f"- command: `{_command()}`"]


def _emit(report: str, out: str | None) -> int:
    """Print the report, and write it to `out` when given."""
    print(report)
    if out:
        pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out).write_text(report)
    return 0


def run_eval_routing(args: argparse.Namespace) -> int:
    from torch_mosa.bench.evaluation import eval_routing_markdown, run_eval_routing_bench

    rows = run_eval_routing_bench(batch=args.eval_batch)
    return _emit(eval_routing_markdown(rows, _header("# Evaluation forward by routing (tiny shape, bf16, random "
                                                     "weights, thresholds calibrated on random tokens, no "
                                                     "gradients)")), args.out)


def run_decode(args: argparse.Namespace) -> int:
    from torch_mosa.bench.decode import decode_markdown, run_decode_bench

    rows = run_decode_bench(tuple(args.decode_batches), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                            cuda_graphs=args.cuda_graphs, compile_step=args.compile_decode, eager=not args.no_eager,
                            reference_decode=args.reference_decode)
    header = _header("# Decode throughput (tiny shape, bf16, random weights, greedy)")
    header.append(f"- prompt {args.prompt_len} tokens, 8 untimed + {args.new_tokens} timed new tokens; KV sizes over "
                  "all tokens held at the end")
    return _emit(decode_markdown(rows, header), args.out)
