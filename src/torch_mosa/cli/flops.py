"""`mosa flops`: heads, parameters and forward FLOPs of a preset model vs its dense twin."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("flops", help="heads, parameters and FLOPs of a model vs its dense baseline")
    p.add_argument("--preset", default="tiny", help="micro, tiny, small, medium, large (default tiny)")
    p.add_argument("--attention", default="mosa", help="dense, mosa, pure_mosa, fixed, routing, local (default mosa)")
    p.add_argument("--sparsity", type=int, default=None, help="sparsity rho (needed for sparse kinds)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def count_parameters(config) -> int:
    import torch

    from torch_mosa.models.lm import MoSALM

    with torch.device("meta"):
        return MoSALM(config).num_parameters()


def run(args) -> int:
    from torch_mosa.config import MoSAConfig
    from torch_mosa.flops import model_flops

    overrides = {"vocab_size": args.vocab_size}
    if args.seq_len is not None:
        overrides["max_seq_len"] = args.seq_len
    config = MoSAConfig.from_preset(args.preset, attention=args.attention, sparsity=args.sparsity, **overrides)
    dense = MoSAConfig.from_preset(args.preset, attention="dense", **overrides)
    counts = config.head_counts()
    report = {
        "preset": args.preset, "attention": args.attention, "sparsity": args.sparsity, "seq_len": config.max_seq_len,
        "num_dense_heads": counts.get("dense", 0),
        "num_mosa_heads": counts.get("mosa", 0),
        "head_counts": counts,
        "params": count_parameters(config),
        "forward_flops": model_flops(config),
        "dense_params": count_parameters(dense),
        "dense_forward_flops": model_flops(dense),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    heads = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    print(f"{args.preset} {args.attention}" + (f" sparsity {args.sparsity}" if args.sparsity else "")
          + f", T={config.max_seq_len}: {heads} heads per layer")
    print(f"  {'':10} {'params':>14} {'fwd GFLOPs/seq':>16}")
    print(f"  {'dense':10} {report['dense_params']:>14,} {report['dense_forward_flops'] / 1e9:>16.2f}")
    print(f"  {'this':10} {report['params']:>14,} {report['forward_flops'] / 1e9:>16.2f}")
    return 0
