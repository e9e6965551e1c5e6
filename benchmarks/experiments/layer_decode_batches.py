"""The fused layer decode step (one program per (row, dense head) and per (row, MoSA head slot), routing inside)
against the separate steps (the dense layer step, then sparse_decode's step, grouped by head from 8 (row, slot)
pairs per head: session 8's rule for the 4 + 17 model from B=32), compiled + CUDA-graphed, beside torch-mosa dense
and the yardstick, in one process.

Session 9, first run (results/layer-decode-batches-h200-2026-11-24-0255.log): the layer step of session 8 (one
MoSA program per (row, head), after the dense ones) was 0.79x torch-mosa dense at B=32 and 0.74x at B=64, against
0.81x and 0.93x for the separate steps. Its MoSA programs now come first and number one per head slot.

Why it may pay: the separate steps' all-heads Q|K|V GEMM, route kernel, router GEMM, grouped output GEMM and the sum
of the two parts' outputs (about 26 us per layer at B=32 on an H200, results/profile-decode-compiled-h200-2026-11-24-
0158.txt) against the layer step's MoSA programs, which project only the (row, head) pairs a token joined (about 0.4
per row and layer in these models) beside the dense programs' longer walk of the cache.

Also at B=32: the dense heads' positions per step (`DENSE_BLOCK_SLOTS`) at 256 for both models, and the kernels of
one compiled step of each (profile_decode_compiled.py's table).

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/layer_decode_batches.py --out DIR`; `--cpu` runs
the micro model on the CPU for the plumbing only (no timing worth reading).
"""

import argparse
import pathlib

import torch

import torch_mosa.layers.hybrid as hybrid
from torch_mosa.bench.decode import build_model, time_decode
from torch_mosa.ops.decode import LAYER_DECODE_MAX_MOSA_HEADS, layer_decode_suits
from torch_mosa.ops.decode import triton_decode

BATCHES = (1, 16, 32, 64)


def separate_from_grouping(batch, heads, limit):
    """Session 8's rule: the layer step only below GROUPED_PAIRS_PER_HEAD (row, slot) pairs per head."""
    width = heads if limit is None else min(limit, heads)
    return heads <= LAYER_DECODE_MAX_MOSA_HEADS and not triton_decode.grouped_decode(batch, width, heads)


RULES = {"separate steps from 8 pairs per head (session 8)": separate_from_grouping,
         "layer step (shipped)": layer_decode_suits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--out", default=".")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    args = parser.parse_args()
    device, preset, prompt, new = ("cpu", "micro", 16, 4) if args.cpu else ("cuda", "tiny", 256, 128)
    dtype = torch.float32 if args.cpu else torch.bfloat16
    graphs = not args.cpu
    dense, mosa = (build_model(name, preset, device, dtype) for name in ("dense", "mosa 4+17 s32"))

    def timed(model, batch, **kwargs):
        torch._dynamo.reset()
        return time_decode(model, batch, prompt, new, cuda_graphs=graphs, compile_step=graphs, **kwargs)["tokens_per_s"]

    rows = []
    shipped_slots = triton_decode.DENSE_BLOCK_SLOTS
    for batch in args.batches:
        for slots in (shipped_slots, 256) if batch == 32 else (shipped_slots,):
            triton_decode.DENSE_BLOCK_SLOTS = slots
            reference = timed(dense, batch)
            if slots == shipped_slots:
                rows.append(("yardstick", batch, slots, timed(dense, batch, yardstick=True), reference))
            rows.append(("torch-mosa dense", batch, slots, reference, reference))
            for name, rule in RULES.items():
                hybrid.layer_decode_suits = rule
                tokens = timed(mosa, batch)
                hybrid.layer_decode_suits = layer_decode_suits
                rows.append((f"4 + 17, {name}", batch, slots, tokens, reference))
            for row in rows[-3:]:
                print(f"{row[0]}, B={row[1]}, dense slots {row[2]}: {row[3]:,.0f} tokens/s "
                      f"({row[3] / row[4]:.2f}x torch-mosa dense)", flush=True)
        triton_decode.DENSE_BLOCK_SLOTS = shipped_slots
    table = ["| model | B | dense positions/step | tokens/s | vs torch-mosa dense (same positions/step) |",
             "|---|---|---|---|---|"]
    table += [f"| {name} | {batch} | {slots} | {tokens:,.0f} | {tokens / reference:.2f}x |"
              for name, batch, slots, tokens, reference in rows]
    if not args.cpu:  # the kernels of one step at B=32, each rule
        import sys

        sys.path.insert(0, str(pathlib.Path(__file__).parent))
        from profile_decode_compiled import kernels_per_step, step_function

        table += ["", "| model at B=32 | kernels/step | GPU kernel us/step |", "|---|---|---|"]
        for name, rule in RULES.items():
            hybrid.layer_decode_suits = rule
            torch._dynamo.reset()
            with torch.no_grad():
                step, token = step_function("mosa 4+17 s32", mosa, 32)
                kernels = kernels_per_step(step, token)
            hybrid.layer_decode_suits = layer_decode_suits
            table.append(f"| 4 + 17, {name} | {sum(c for c, _ in kernels.values()):.1f} | "
                         f"{sum(c * us for c, us in kernels.values()):.1f} |")
            lines = [f"  {c:6.1f} x {us:8.2f} us  {k[:100]}" for k, (c, us) in
                     sorted(kernels.items(), key=lambda kv: -kv[1][0] * kv[1][1])[:14]]
            print(f"== 4 + 17, {name}, B=32\n" + "\n".join(lines), flush=True)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(args.out) / "layer-decode-batches.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
