"""`mosa eval`: validation loss, perplexity (and bits per byte for byte-level data) of a checkpoint, under the
paper's top-k routing and/or causal routing side by side, with the causal KV-cache size per token."""

from __future__ import annotations

import json


# Batches read by default: a few seconds for the micro preset on a CPU; --full reads the whole split.
DEFAULT_MAX_BATCHES = 8


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint (or a run's latest) on data", description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest checkpoint)")
    p.add_argument("--data", default=None, help="a prepared shard directory or raw text (default: the run's data)")
    p.add_argument("--split", choices=("train", "val"), default="val", help="split of a shard directory")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the model's maximum)")
    p.add_argument("--max-batches", type=int, default=DEFAULT_MAX_BATCHES,
                   help=f"evaluate the first N batches of the split (default {DEFAULT_MAX_BATCHES}: seconds on a CPU)")
    p.add_argument("--full", action="store_true", help="evaluate the whole split (overrides --max-batches)")
    p.add_argument("--routing", nargs="+", choices=("topk", "causal"), default=["topk"],
                   help="topk: the paper's expert-choice routing (sees the whole window, non-causal); causal: "
                        "per-token thresholds, as generation uses. Several are evaluated side by side.")
    p.add_argument("--calibrate-batches", type=int, default=0,
                   help="before causal evaluation, calibrate the thresholds on N training batches (default 0: "
                        "use the checkpoint's thresholds, e.g. from `mosa calibrate`)")
    p.add_argument("--causal-capacity", type=int, default=None,
                   help="with causal routing, a MoSA head keeps at most N tokens per sequence and the causal forward "
                        "runs at that width (default: no limit); dropped joins are reported as the overflow rate")
    p.add_argument("--decode-tokens", type=int, default=0,
                   help="with causal routing, also time greedy decoding of N tokens (one sequence, KV cache)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--pack-documents", action="store_true",
                   help="keep the documents inside each window apart (split at the end-of-text token), as a model "
                        "trained with --pack-documents saw them")
    p.add_argument("--per-document", action="store_true",
                   help="also report the loss of every document (book) of the split, window by window")
    p.add_argument("--against", default=None, metavar="CHECKPOINT",
                   help="evaluate another checkpoint (or run) on the same windows and report the paired "
                        "per-window difference with a bootstrap 95%% interval")
    p.add_argument("--json", action="store_true", help="print one JSON object per routing")
    p.set_defaults(run=run)


def run(args) -> int:
    from torch_mosa.checks import resolve_device
    from torch_mosa.evaluation import evaluate_checkpoint, losses_by_document, per_document
    from torch_mosa.statistics import paired_difference

    device = resolve_device(args.device)
    per_window = args.per_document or args.against is not None
    for routing in dict.fromkeys(args.routing):
        options = dict(split=args.split, batch_size=args.batch_size, seq_len=args.seq_len,
                       max_batches=None if args.full else args.max_batches, device=device,
                       progress=args.progress and not args.json, routing=routing,
                       calibrate_batches=args.calibrate_batches, causal_capacity=args.causal_capacity,
                       pack_documents=args.pack_documents, per_window=per_window)
        result = evaluate_checkpoint(args.checkpoint, args.data, decode_tokens=args.decode_tokens, **options)
        if args.per_document:
            result["per_document"] = per_document(result)
        if args.against is not None:  # the same windows of the same data (the first checkpoint's)
            other = evaluate_checkpoint(args.against, result["data"], **options)
            result["against"] = {"checkpoint": other["checkpoint"], "loss": other["loss"], "ppl": other["ppl"],
                                 **paired_difference(result["window_losses"], other["window_losses"])}
            if args.per_document:
                theirs = {row["document"]: row for row in per_document(other)}
                mine, their = losses_by_document(result), losses_by_document(other)
                for row in result["per_document"]:
                    row["against_ppl"] = theirs[row["document"]]["ppl"]
                    row["difference"] = paired_difference(mine[row["document"]], their[row["document"]])
        if args.json:
            print(json.dumps(result))
            continue
        line = f"loss {result['loss']:.4f}, ppl {result['ppl']:.3f}"
        if "bpb" in result:
            line += f", {result['bpb']:.4f} bits/byte"
        if "kv_pairs_per_token" in result:
            line += (f", KV cache {result['kv_pairs_per_token']:.1f} pairs/token "
                     f"({result['kv_bytes_per_token']:,.0f} bytes/token)")
        if "causal_overflow_rate" in result:
            line += (f", joins {result['causal_join_rate']:.4f} of (token, head) slots, "
                     f"{result['causal_overflow_rate']:.4f} dropped by the causal limits")
        if "decode_tokens_per_s" in result:
            line += f", decode {result['decode_tokens_per_s']:,.1f} tokens/s"
        windows = f"{result['windows']:,} of {result['split_windows']:,} windows"
        if result["windows"] < result["split_windows"]:
            windows += ", --full for all"
        print(f"[{routing}] {result['checkpoint']} on {result['data']} ({result['split']}, {windows}, "
              f"{result['tokens']:,} tokens): {line}")
        if "against" in result:
            paired = result["against"]
            low, high = paired["ppl_ratio_interval"]
            print(f"  against {paired['checkpoint']} (ppl {paired['ppl']:.3f}), same {paired['windows']:,} windows: "
                  f"loss {paired['mean_difference']:+.4f} nats/token, ppl ratio {paired['ppl_ratio']:.4f} "
                  f"(95% interval {low:.4f} .. {high:.4f}), lower loss on {paired['a_better_share']:.0%} of windows")
        for row in result.get("per_document", []):
            cells = f"  document {row['document']:>4} ({row['windows']:,} windows) ppl {row['ppl']:10.3f}"
            if "difference" in row:
                low, high = row["difference"]["ppl_ratio_interval"]
                cells += (f"  vs {row['against_ppl']:10.3f}: ratio {row['difference']['ppl_ratio']:.4f} "
                          f"({low:.4f} .. {high:.4f})")
            print(f"{cells}  {row['label']}")
    return 0
