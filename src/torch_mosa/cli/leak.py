"""`mosa leak`: how much a checkpoint's loss on the tokens before a cut point depends on the tokens after it.

Top-k routing (the paper's) sees the whole window, so replacing the window's future can change the loss before the
cut; causal routing and dense attention cannot (the change is then exactly 0 on a deterministic device; the report
prints the run-to-run noise beside it). See torch_mosa/leak.py.
"""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("leak", help="measure how much top-k routing lets a model see the future",
                              description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest checkpoint)")
    p.add_argument("--data", default=None, help="a prepared shard directory (default: the run's data)")
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the model's maximum)")
    p.add_argument("--cut", type=int, default=None, help="first replaced position (default: half the window)")
    p.add_argument("--windows", type=int, default=64, help="windows spread over the split (default 64)")
    p.add_argument("--replacement", nargs="+", choices=("other", "far"), default=["other", "far"],
                   help="the future's replacement: text of another document, or of the same document far away")
    p.add_argument("--routing", nargs="+", choices=("topk", "causal"), default=["topk"],
                   help="routings to measure (causal needs calibrated thresholds: see --calibrate-batches)")
    p.add_argument("--calibrate-batches", type=int, default=0,
                   help="with causal routing, first calibrate the thresholds on N training batches")
    p.add_argument("--by-position", type=int, default=0, metavar="BUCKETS",
                   help="also print the mean loss by position in the window, in BUCKETS equal spans, for each "
                        "routing (and top-k minus causal when both are measured)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ... (default auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object per measurement")
    p.set_defaults(run=run)


def run(args) -> int:
    import contextlib

    import torch

    from torch_mosa.checks import resolve_device
    from torch_mosa.data.shards import TokenDataset
    from torch_mosa.inference.calibrate import calibrate_on_dataset
    from torch_mosa.leak import future_leak, loss_by_position
    from torch_mosa.runs import load_model, resolve_checkpoint, training_data_dir

    if args.by_position < 0:
        raise ValueError(f"--by-position must be >= 0 (0: off), got {args.by_position}")
    device = resolve_device(args.device)
    path = resolve_checkpoint(args.checkpoint)
    model, config = load_model(path, device)
    seq_len = args.seq_len or config.max_seq_len
    if seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len={config.max_seq_len}")
    cut = args.cut if args.cut is not None else seq_len // 2
    data_dir = training_data_dir(path, args.data)
    dataset = TokenDataset(data_dir, args.split)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        if "causal" in args.routing and args.calibrate_batches:
            calibrate_on_dataset(model, TokenDataset(data_dir, "train"), args.batch_size, seq_len,
                                 args.calibrate_batches, device)
        for routing in dict.fromkeys(args.routing):
            for replacement in dict.fromkeys(args.replacement):
                result = future_leak(model, dataset, seq_len, cut, args.windows, replacement, routing,
                                     args.batch_size, device)
                if args.json:
                    print(json.dumps({"checkpoint": str(path), **result}))
                    continue
                low, high = result["interval"]
                source = "another document" if replacement == "other" else "far away in the same document"
                print(f"[{routing}, future from {source}] {result['windows']} windows of {seq_len}, cut at {cut}: "
                      f"loss before the cut {result['loss_before_cut']:.4f}, change {result['mean_change']:+.2e} nats/token "
                      f"(95% interval {low:+.2e} .. {high:+.2e}), mean |change| {result['mean_abs_change']:.2e}, "
                      f"{result['changed_share']:.0%} of windows changed, noise {result['noise']:.1e}")
        if args.by_position:
            curves = {routing: loss_by_position(model, dataset, seq_len, args.windows, routing, args.batch_size,
                                                device) for routing in dict.fromkeys(args.routing)}
            if "topk" in curves and "causal" in curves:
                curves["topk - causal"] = curves["topk"] - curves["causal"]
            print(position_table(curves, args.by_position, json_lines=args.json))
    return 0


def position_table(curves: dict, buckets: int, json_lines: bool = False) -> str:
    """Mean of each [T] loss curve over `buckets` equal spans of positions: a text table, or one JSON line."""
    import torch

    seq_len = len(next(iter(curves.values())))
    edges = torch.linspace(0, seq_len, min(buckets, seq_len) + 1).round().long().tolist()
    spans = list(zip(edges[:-1], edges[1:]))
    means = {name: [float(curve[a:b].mean()) for a, b in spans] for name, curve in curves.items()}
    if json_lines:
        return json.dumps({"positions": [[a, b - 1] for a, b in spans], "mean_loss": means})
    lines = ["positions " + "".join(f"{name:>16}" for name in means)]
    for i, (a, b) in enumerate(spans):
        lines.append(f"{a:>4}-{b - 1:<4} " + "".join(f"{means[name][i]:16.4f}" for name in means))
    return "\n".join(lines)
