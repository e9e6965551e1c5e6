"""The layer decode step grouped by head (built in session 8, not yet run on a GPU) against the separate steps it
would replace, for the 4 + 17 model at the batch sizes where a step is grouped (8 or more (row, head) pairs per
head), compiled + CUDA-graphed, beside torch-mosa dense and the yardstick, in one process.

`layer_decode_suits` sends such batches to the separate steps (the dense layer step, then sparse_decode's grouped
step); this script times them once that way and once with the rule bounding only the head count (the fused layer
step, grouped). Run `pytest -m cuda tests/ops/test_layer_decode.py` first: its B=32 case is the grouped step.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/layer_decode_grouped.py`; `--cpu` runs the micro
model on the CPU for the plumbing only (no timing worth reading).
"""

import argparse

import torch

import torch_mosa.layers.hybrid as hybrid
from torch_mosa.bench.decode import build_model, time_decode
from torch_mosa.ops.decode import LAYER_DECODE_MAX_MOSA_HEADS, layer_decode_suits

BATCHES = (16, 32, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    device, preset, prompt, new = ("cpu", "micro", 16, 4) if args.cpu else ("cuda", "tiny", 256, 128)
    dtype = torch.float32 if args.cpu else torch.bfloat16
    graphs = not args.cpu
    dense, hybrid_model = (build_model(name, preset, device, dtype) for name in ("dense", "mosa 4+17 s32"))
    rules = {"separate steps (as shipped)": layer_decode_suits,
             "fused layer step, grouped": lambda batch, heads, limit: heads <= LAYER_DECODE_MAX_MOSA_HEADS}
    rows = []
    for batch in BATCHES:
        torch._dynamo.reset()
        yardstick = time_decode(dense, batch, prompt, new, cuda_graphs=graphs, yardstick=True,
                                compile_step=graphs)["tokens_per_s"]
        torch._dynamo.reset()
        reference = time_decode(dense, batch, prompt, new, cuda_graphs=graphs, compile_step=graphs)["tokens_per_s"]
        rows += [("yardstick", batch, yardstick, reference), ("torch-mosa dense", batch, reference, reference)]
        for name, rule in rules.items():
            hybrid.layer_decode_suits = rule
            torch._dynamo.reset()
            tokens = time_decode(hybrid_model, batch, prompt, new, cuda_graphs=graphs,
                                 compile_step=graphs)["tokens_per_s"]
            rows.append((f"4 + 17, {name}", batch, tokens, reference))
            print(f"4 + 17, {name}, B={batch}: {tokens:,.0f} tokens/s ({tokens / reference:.2f}x dense)", flush=True)
        hybrid.layer_decode_suits = layer_decode_suits
    print("\n| model | B | tokens/s | vs torch-mosa dense |\n|---|---|---|---|")
    for name, batch, tokens, reference in rows:
        print(f"| {name} | {batch} | {tokens:,.0f} | {tokens / reference:.2f}x |")


if __name__ == "__main__":
    main()
