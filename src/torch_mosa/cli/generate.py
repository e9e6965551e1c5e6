"""`mosa generate`: continue a prompt with a trained checkpoint, using causal routing and the sparse KV cache."""

from __future__ import annotations

import sys
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint", description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest checkpoint)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from torch_mosa.data.tokenizer import load_tokenizer
    from torch_mosa.inference.calibrate import uncalibrated
    from torch_mosa.train.checkpoint import load_model, resolve_checkpoint
    from torch_mosa.train.evaluate import training_data_dir

    path = resolve_checkpoint(args.checkpoint)
    model, _ = load_model(path, args.device)
    if uncalibrated(model):
        print(f"warning: {path} has uncalibrated causal-routing thresholds; run `mosa calibrate` first for the "
              "cache sizes and quality of top-k routing", file=sys.stderr)
    tokenizer = load_tokenizer(training_data_dir(path))
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt is empty after tokenization: give at least one character")
    input_ids = torch.tensor([prompt], device=args.device)
    start = time.perf_counter()
    output, cache = model.generate(input_ids, args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                   stop_tokens=None if args.no_stop else [tokenizer.eot_id], return_cache=True)
    seconds = time.perf_counter() - start
    new = output[0, len(prompt):].tolist()
    print(args.prompt + tokenizer.decode([t for t in new if t != tokenizer.eot_id]))
    print(f"[{len(new)} new tokens in {seconds:.2f} s; KV cache {cache.pairs():,} key-value pairs, "
          f"{cache.bytes_held():,} bytes held for {output.shape[1]} tokens]", file=sys.stderr)
    return 0
