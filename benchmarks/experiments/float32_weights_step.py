"""Float32 weights read by the MoSA kernels under autocast, against 16-bit weight copies made per step (issue 10).

Under bf16 autocast the layers cast W_QKV, W_O and the router weight to bf16 on every forward (a [E, h, 3d] fp32
read and bf16 write per layer, kept for the backward) and autograd casts their bf16 gradients back to fp32. Since
session 12 the op can take the fp32 parameters as they are, read them in x's dtype inside the kernels and store fp32
gradients; `layers.sparse.FLOAT32_WEIGHTS_UNDER_AUTOCAST` makes the layers do so. This script times the compiled
Tiny training step (`mosa bench --train-step`'s `training_step`) both ways: "copies" (the switch off, the default)
and "fp32" (on). Order dense, then per model fp32, copies, fp32 (the repeat shows the drift). With --cuda-graphs each
step is a CUDA graph replay. If fp32 wins, turn the switch on by default.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/float32_weights_step.py [--models s64 s16 4+17]`.
"""

import argparse
import contextlib
import sys


@contextlib.contextmanager
def float32_weights(on: bool):
    """`layers.sparse.FLOAT32_WEIGHTS_UNDER_AUTOCAST` set to `on` (read while the model is traced)."""
    from torch_mosa.layers import sparse

    previous = sparse.FLOAT32_WEIGHTS_UNDER_AUTOCAST
    sparse.FLOAT32_WEIGHTS_UNDER_AUTOCAST = on
    try:
        yield
    finally:
        sparse.FLOAT32_WEIGHTS_UNDER_AUTOCAST = previous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["s64", "s16", "4+17"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cuda-graphs", action="store_true")
    args = parser.parse_args()
    import torch

    from torch_mosa.bench.cases import TRAIN_MODEL_IDS, TRAIN_MODELS, train_step_tokens_per_second

    def time(model_id):
        rate, mib = train_step_tokens_per_second(TRAIN_MODELS[TRAIN_MODEL_IDS[model_id]], steps=args.steps,
                                                 cuda_graph=args.cuda_graphs)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        return rate, mib

    dense, dense_mib = time("dense")
    rows = [("dense", "-", dense, dense_mib)]
    print(f"dense: {dense:,.0f} tokens/s, {dense_mib:.0f} MiB", flush=True)
    for model_id in args.models:
        for how in ("fp32", "copies", "fp32"):
            with float32_weights(how == "fp32"):
                rate, mib = time(model_id)
            rows.append((model_id, how, rate, mib))
            print(f"{model_id} {how}: {rate:,.0f} tokens/s ({rate / dense:.3f}x dense), {mib:.0f} MiB", flush=True)
    print("\n| model | weights | tokens/s | vs dense | peak MiB |\n|---|---|---|---|---|")
    for model_id, how, rate, mib in rows:
        print(f"| {model_id} | {how} | {rate:,.0f} | {rate / dense:.3f}x | {mib:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
