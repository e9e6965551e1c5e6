"""`mosa bench`: SPEC §6 cases A-D for dense SDPA, the MoSA reference path and the fast path; writes markdown."""

from __future__ import annotations

import pathlib
import sys


def add_arguments(p) -> None:
    p.add_argument("--cases", nargs="+", default=["A", "B", "C", "D"], help="any of A B C D (default all)")
    p.add_argument("--paths", nargs="+", default=["dense", "reference", "fast"],
                   help="any of dense reference fast (default all)")
    p.add_argument("--reference-max-seq-len", type=int, default=131072,
                   help="skip the reference path above this T (case D); the table says 'not run'")
    p.add_argument("--train-step", action="store_true", help="also time one training step of tiny (rho=64 vs dense)")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--out", default=None, help="write the markdown table here")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time MoSA layers (dense / reference / fast path) on a CUDA GPU")
    add_arguments(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from torch_mosa.bench import CASES, markdown_report, run_cases, train_step_tokens_per_second

    if not torch.cuda.is_available():
        raise ValueError("mosa bench needs a CUDA GPU; none is available")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        raise ValueError(f"--cases must be among {sorted(CASES)}, got {unknown}")
    rows = run_cases(args.cases, tuple(args.paths), args.reference_max_seq_len)
    train_rows = []
    if args.train_step:
        for name, attention in (("dense", "dense"), ("MoSA rho=64 (fast path)", "mosa")):
            tokens_per_s, mib = train_step_tokens_per_second(attention, batch=args.train_batch)
            train_rows.append((name, args.train_batch, tokens_per_s, mib))
            print(f"train step {name}: {tokens_per_s:,.0f} tokens/s, {mib:.0f} MiB")
    report = markdown_report(rows, train_rows, command=" ".join(["python -m torch_mosa.bench", *sys.argv[1:]]))
    print(report)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(report)
    return 0
