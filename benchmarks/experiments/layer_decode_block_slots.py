"""Cache positions per step of a dense head in the fused layer decode step (`DENSE_BLOCK_SLOTS` of
ops/decode/triton_decode.py), timed in whole compiled + CUDA-graphed decode steps beside the yardstick, in one process.

A dense head's program walks every cached position up to the token's in steps of DENSE_BLOCK_SLOTS, a chain of
dependent loads: fewer, wider steps shorten the chain and cost registers. Models: torch-mosa dense and the 4 + 17
model (whose B=1 step is one fused launch for both kinds of head) at B=1 and B=32.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/layer_decode_block_slots.py`.
"""

import torch

from torch_mosa.bench.decode import build_model, time_decode
from torch_mosa.ops.decode import triton_decode

BLOCKS = (64, 128, 256)
MODELS = ("dense", "mosa 4+17 s32")


def main() -> None:
    models = {name: build_model(name, "tiny", "cuda", torch.bfloat16) for name in MODELS}
    rows = []
    for batch in (1, 32):
        torch._dynamo.reset()
        yardstick = time_decode(models["dense"], batch, 256, 128, cuda_graphs=True, yardstick=True,
                                compile_step=True)["tokens_per_s"]
        rows.append(("yardstick", batch, "-", yardstick))
        for block in BLOCKS:
            triton_decode.DENSE_BLOCK_SLOTS = block
            for name, model in models.items():
                torch._dynamo.reset()  # a fresh compilation and graph per configuration
                tokens = time_decode(model, batch, 256, 128, cuda_graphs=True, compile_step=True)["tokens_per_s"]
                rows.append((name, batch, block, tokens))
                print(f"{name} B={batch} DENSE_BLOCK_SLOTS={block}: {tokens:,.0f} tokens/s ({tokens / yardstick:.2f}x "
                      "the yardstick)", flush=True)
    print("\n| model | B | dense block slots | tokens/s | vs yardstick |\n|---|---|---|---|---|")
    for name, batch, block, tokens in rows:
        ref = next(t for n, b, _, t in rows if n == "yardstick" and b == batch)
        print(f"| {name} | {batch} | {block} | {tokens:,.0f} | {tokens / ref:.2f}x |")


if __name__ == "__main__":
    main()
