"""The split path in whole Tiny training steps, and where a compiled layer's GPU time goes on each path (issue 10).

`split_projection.py` timed the op and the compiled layer. This script times what issue 10's end-to-end table times,
the compiled Tiny training step (B=64 x 1024, bf16 autocast, fused AdamW; `mosa bench --train-step`'s
`training_step`), with `triton_mosa.SPLIT_PROJECTION` forced off, on, and off again (the repeat shows the drift
between the first and last timing). Since session 11 the split path's forward keeps Q|K|V for the backward, so the
flag also sets the saved tensor's shape, which torch.compile reads at trace time: each setting compiles afresh. Then it
profiles one forward + backward of the compiled SPEC §6 layers A and B on each path and prints the GPU time per
kernel, so the time outside the MoSA op (router, selection, dense heads, elementwise work) is seen beside it.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/split_train_step.py --out DIR
[--models dense s16 4+17 s64] [--cases A B]`.
"""

import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["dense", "s16", "4+17", "s64"])
    parser.add_argument("--cases", nargs="*", default=["A", "B"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    from torch_mosa.bench.cases import (CASES, TRAIN_MODEL_IDS, TRAIN_MODELS, _layers, case_inputs,
                                        train_step_tokens_per_second)
    from torch_mosa.ops.dispatch import fast_path
    from torch_mosa.ops.mosa import triton_mosa as tm

    results = dict(train=[], profiles={})
    dense_rate = None
    for model_id in args.models:
        name = TRAIN_MODEL_IDS[model_id]
        settings = [None] if model_id == "dense" else [False, True, False]
        for setting in settings:
            tm.SPLIT_PROJECTION = setting
            rate, mib = train_step_tokens_per_second(TRAIN_MODELS[name], batch=64, steps=args.steps)
            tm.SPLIT_PROJECTION = None
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            if model_id == "dense":
                dense_rate = rate
            label = {None: "-", False: "fused", True: "split"}[setting]
            ratio = rate / dense_rate if dense_rate else float("nan")
            results["train"].append(dict(model=name, path=label, tokens_per_s=rate, peak_mib=mib, vs_dense=ratio))
            print(f"train step {name}, {label}: {rate:,.0f} tokens/s ({ratio:.2f}x dense), {mib:.0f} MiB",
                  flush=True)

    for case_name in args.cases:
        case = CASES[case_name][0]
        torch.manual_seed(0)
        mosa, _ = _layers(case, torch.device("cuda"))
        x, grad_y = case_inputs(case, "cuda")
        results["profiles"][case_name] = {}
        for setting in (False, True):
            tm.SPLIT_PROJECTION = setting
            torch._dynamo.reset()
            layer = torch.compile(mosa)
            with fast_path(True):
                for _ in range(3):
                    layer(x).backward(grad_y)
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    layer(x).backward(grad_y)
                    torch.cuda.synchronize()
            tm.SPLIT_PROJECTION = None
            kernels = {e.key: e.device_time_total / 1e3 for e in prof.key_averages() if e.device_time_total > 0}
            total = sum(kernels.values())
            top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:16])
            label = "split" if setting else "fused"
            results["profiles"][case_name][label] = dict(total_ms=total, kernels=top)
            print(f"\nlayer {case_name} compiled, {label}: {total:.3f} ms of GPU kernels per forward + backward")
            for key, ms in top.items():
                print(f"  {ms:7.3f} ms  {key[:100]}")
        del layer, mosa
        torch._dynamo.reset()
        torch.cuda.empty_cache()

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "split-train-step.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("\n| model | path | tokens/s | vs dense | peak MiB |")
    print("|---|---|---|---|---|")
    for r in results["train"]:
        print(f"| {r['model']} | {r['path']} | {r['tokens_per_s']:,.0f} | {r['vs_dense']:.2f}x | {r['peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
