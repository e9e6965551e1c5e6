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

Variants of the layer step: the output kernel's tile (`OUT_BLOCK_H` x `OUT_BLOCK_K`, shared with the sparse step);
at B=32 the kernels of one compiled step of each (profile_decode_compiled.py's table).

Second run (results/layer-decode-batches-h200-2026-11-24-0311.log): MoSA programs per slot and first took B=32 from
0.80x to 0.96x torch-mosa dense (B=64 0.92x against the separate steps' 0.94x; B=1 and 16 level); the heads kernel
took 24.6 us per layer at B=32 (dense's 9-head kernel 22.4) and the output kernel 6.7 us (dense's cuBLAS GEMM 3.4).

Third run (results/layer-decode-batches-h200-2026-11-24-0321.log): one MoSA program per row, taking its J slots in
turn, was slower at every batch (0.94x / 0.80x / 0.88x / 0.92x torch-mosa dense at B=1 / 16 / 32 / 64, against
1.00x / 0.93x / 0.98x / 0.94x per slot) and was removed; a 64 x 256 output tile was mixed (0.98x at B=1, 0.99x at
B=32, 0.96x at B=64), so the 32 x 512 tile stays.

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


# (name, layer_decode_suits replacement or None for the shipped rule, triton_decode settings)
VARIANTS = [
    ("separate steps from 8 pairs per head (session 8)", separate_from_grouping, {}),
    ("layer step, per slot (shipped)", None, {}),
    ("layer step, per slot, output 64 x 256", None, {"OUT_BLOCK_H": 64, "OUT_BLOCK_K": 256}),
]


def variant(rule, settings):
    """Context: the variant's rule and module settings, restored after."""
    import contextlib

    @contextlib.contextmanager
    def applied():
        saved = {name: getattr(triton_decode, name) for name in settings}
        hybrid.layer_decode_suits = rule or layer_decode_suits
        for name, value in settings.items():
            setattr(triton_decode, name, value)
        try:
            yield
        finally:
            hybrid.layer_decode_suits = layer_decode_suits
            for name, value in saved.items():
                setattr(triton_decode, name, value)

    return applied()


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
    for batch in args.batches:
        reference = timed(dense, batch)
        rows += [("yardstick", batch, timed(dense, batch, yardstick=True), reference),
                 ("torch-mosa dense", batch, reference, reference)]
        for name, rule, settings in VARIANTS:
            with variant(rule, settings):
                tokens = timed(mosa, batch)
            rows.append((f"4 + 17, {name}", batch, tokens, reference))
            print(f"4 + 17, {name}, B={batch}: {tokens:,.0f} tokens/s ({tokens / reference:.2f}x torch-mosa dense)",
                  flush=True)
    table = ["| model | B | tokens/s | vs torch-mosa dense |", "|---|---|---|---|"]
    table += [f"| {name} | {batch} | {tokens:,.0f} | {tokens / reference:.2f}x |"
              for name, batch, tokens, reference in rows]
    if not args.cpu:  # the kernels of one step at B=32, each variant
        import sys

        sys.path.insert(0, str(pathlib.Path(__file__).parent))
        from profile_decode_compiled import kernels_per_step, step_function

        table += ["", "| model at B=32 | kernels/step | GPU kernel us/step |", "|---|---|---|"]
        for name, rule, settings in VARIANTS:
            torch._dynamo.reset()
            with variant(rule, settings), torch.no_grad():
                step, token = step_function("mosa 4+17 s32", mosa, 32)
                kernels = kernels_per_step(step, token)
            table.append(f"| 4 + 17, {name} | {sum(c for c, _ in kernels.values()):.1f} | "
                         f"{sum(c * us for c, us in kernels.values()):.1f} |")
            lines = [f"  {c:6.1f} x {us:8.2f} us  {k[:100]}" for k, (c, us) in
                     sorted(kernels.items(), key=lambda kv: -kv[1][0] * kv[1][1])[:8]]
            print(f"== 4 + 17, {name}, B=32\n" + "\n".join(lines), flush=True)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(args.out) / "layer-decode-batches.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
