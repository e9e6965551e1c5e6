"""Which k should take the split path now that it keeps Q|K|V (session 11, issue 10), on a GPU.

Until session 10 the split path recomputed Q|K|V in the backward, and won only from k = 64 (`SPLIT_MIN_K`). Session
11 keeps them from the forward (the backward's row kernel recomputes O from them instead), which saves one grouped
GEMM per backward. This script measures, with `triton_mosa.SPLIT_PROJECTION` forced off and on:
1. the compiled layers of SPEC §6 cases A, B and C beside a compiled dense layer (`mosa bench --compile-layers`'
   method, `run_case`), time and peak memory;
2. the compiled Tiny training step (`mosa bench --train-step`'s `training_step`) of the 4 + 17 model (k 32).

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/split_keeps_qkv.py --out DIR`.
"""

import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["A", "B", "C"])
    parser.add_argument("--models", nargs="*", default=["4+17"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    from torch_mosa.bench.cases import CASES, TRAIN_MODEL_IDS, TRAIN_MODELS, run_case, train_step_tokens_per_second
    from torch_mosa.ops.mosa import triton_mosa as tm

    rows = []
    for name in args.cases:
        for case in CASES[name]:
            for split in (False, True):
                tm.SPLIT_PROJECTION = split
                result = run_case(case, paths=("dense", "fast"), compile_layers=True)
                tm.SPLIT_PROJECTION = None
                (dense_ms, dense_mib), (ms, mib) = result["dense"], result["fast"]
                rows.append(dict(what=f"layer {case.name}", path="split" if split else "fused", dense=dense_ms,
                                 mosa=ms, ratio=ms / dense_ms, memory_ratio=mib / dense_mib))
                print(rows[-1], flush=True)
    dense_rate = None
    for model_id in (["dense"] if args.models else []) + args.models:
        name = TRAIN_MODEL_IDS[model_id]
        for split in ([None] if model_id == "dense" else [False, True]):
            tm.SPLIT_PROJECTION = split
            rate, mib = train_step_tokens_per_second(TRAIN_MODELS[name], batch=64)
            tm.SPLIT_PROJECTION = None
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            dense_rate = dense_rate or rate
            rows.append(dict(what=f"train step {name}", path={None: "-", False: "fused", True: "split"}[split],
                             dense=dense_rate, mosa=rate, ratio=rate / dense_rate, memory_ratio=float("nan"),
                             peak_mib=mib))
            print(rows[-1], flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "split-keeps-qkv.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| what | path | dense (ms, or tokens/s) | MoSA | MoSA / dense | memory vs dense |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['path']} | {r['dense']:,.3f} | {r['mosa']:,.3f} | {r['ratio']:.2f}x | "
              f"{r['memory_ratio']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
