"""`mosa generate`: continue a prompt with a trained checkpoint, using causal routing and the sparse KV cache."""

from __future__ import annotations

import sys
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint", description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint directory, a run directory (its latest checkpoint) or a Hugging Face "
                                      "model folder written by `mosa export-hf`")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ... (default auto)")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from torch_mosa.checks import resolve_device
    from torch_mosa.cli.export_hf import import_hf, is_model_folder
    from torch_mosa.data.tokenizer import load_tokenizer
    from torch_mosa.inference.calibrate import uncalibrated
    from torch_mosa.runs import load_model, load_run_tokenizer, resolve_checkpoint

    device = resolve_device(args.device)
    if is_model_folder(args.checkpoint):
        path = args.checkpoint
        model = import_hf().MoSAForCausalLM.from_pretrained(path).model.to(device).eval()
        tokenizer = load_tokenizer(path)
    else:
        path = resolve_checkpoint(args.checkpoint)
        model, _ = load_model(path, device)
        tokenizer = load_run_tokenizer(path)
    if uncalibrated(model):
        print(f"warning: {path} has uncalibrated causal-routing thresholds; run `mosa calibrate` first for the "
              "cache sizes and quality of top-k routing", file=sys.stderr)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt is empty after tokenization: give at least one character")
    input_ids = torch.tensor([prompt], device=device)
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
