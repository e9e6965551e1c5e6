"""The fused decode step grouped by head against per (row, slot) pair, in one process (issue 11).

`ops/decode/triton_decode.py` groups a step by head from GROUPED_PAIRS_PER_HEAD (row, slot) pairs per head on: one
batched GEMM for every head's Q|K|V and one output kernel over the dense [B, E*d] rows, instead of each pair reading
its head's weights. This times the 4 + 17 model's compiled + CUDA-graph decode both ways (alternating, twice each)
beside torch-mosa dense, at each batch size.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/decode_grouping.py [--batches 8 32]`.
"""

import argparse

import torch

from torch_mosa.bench.decode import build_model, time_decode
from torch_mosa.ops.decode import triton_decode

PER_PAIR, GROUPED = 10 ** 9, 2  # GROUPED_PAIRS_PER_HEAD for each way


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--model", default="mosa 4+17 s32")
    args = parser.parse_args()
    models = {name: build_model(name, "tiny", "cuda", torch.bfloat16) for name in ("dense", args.model)}
    rows = []
    for batch in args.batches:
        torch._dynamo.reset()
        dense = time_decode(models["dense"], batch, 256, 128, cuda_graphs=True, compile_step=True)["tokens_per_s"]
        for repeat in range(2):
            for label, pairs in (("per pair", PER_PAIR), ("grouped", GROUPED)):
                triton_decode.GROUPED_PAIRS_PER_HEAD = pairs
                torch._dynamo.reset()  # the choice is baked into the compiled graph
                rate = time_decode(models[args.model], batch, 256, 128, cuda_graphs=True,
                                   compile_step=True)["tokens_per_s"]
                rows.append((batch, label, repeat, rate, rate / dense))
                print(f"B={batch} {label} (run {repeat}): {rate:,.0f} tokens/s, {rate / dense:.2f}x dense "
                      f"({dense:,.0f})", flush=True)
    print(f"\n| {args.model} | B | way | run | tokens/s | vs dense |\n|---|---|---|---|---|---|")
    for batch, label, repeat, rate, ratio in rows:
        print(f"| | {batch} | {label} | {repeat} | {rate:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
