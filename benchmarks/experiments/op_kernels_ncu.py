"""The MoSA op's kernels one by one at SPEC §6 case A and B shapes: GPU time per kernel (torch.profiler over
forward + backward, bf16, router gradient inside) and, under Nsight Compute, one launch of each for its memory
traffic (DRAM bytes, L2 hit rate) and throughput, to tell the kernels bound by the scatter's fp32 atomics from
those bound by their dots.

On the GPU machine (PYTHONPATH=src): `python benchmarks/experiments/op_kernels_ncu.py` prints the per-kernel
table; `PROFILE=1 ncu --kernel-name regex:_mosa_ --section SpeedOfLight --section MemoryWorkloadAnalysis python
benchmarks/experiments/op_kernels_ncu.py --cases A` runs forward + backward once for the profiler.
`--tile-groups` also times the forward and the backward with each kernel's programs in other orders
(`triton_mosa.TILE_GROUP`: runs of 1, 2, 4 tiles or all of them, every head over a run before the next), one kernel
changed at a time, the dx kernel with 256-row tiles (half the runs, so half the weight reads at one tile per run),
and the split forward's output projection in a kernel of its own (`triton_mosa.SPLIT_OUTPUT_KERNEL`) per order.
"""

import argparse
import collections
import os

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from torch_mosa.ops.mosa import triton_mosa as tm

SHAPES = {"A": (64, 1024, 512, 505, 16), "B": (64, 1024, 512, 142, 64), "C": (16, 1024, 1024, 381, 16)}


def op_inputs(batch, seq_len, hidden, heads, k, device="cuda", dtype=torch.bfloat16):
    x = torch.randn(batch, seq_len, hidden, device=device, dtype=dtype)
    w_qkv = (torch.randn(heads, hidden, 192, device=device) / hidden ** 0.5).to(dtype)
    w_o = (torch.randn(heads, 64, hidden, device=device) / 8).to(dtype)
    w_router = (torch.randn(heads, hidden, device=device) / hidden ** 0.5).to(dtype)
    logits = torch.rand(batch, heads, seq_len, device=device)
    top = logits.topk(k, dim=-1)
    indices, order = top.indices.sort(dim=-1)
    scores = top.values.gather(-1, order)
    return x, w_qkv, w_o, w_router, indices, scores, torch.randn_like(x)


def step(x, w_qkv, w_o, w_router, indices, scores, dy):
    y, saved = tm.mosa_fwd(x, w_qkv, w_o, indices, scores, 32, 1e4)
    return tm.mosa_bwd(dy, x, w_qkv, w_o, w_router, indices, scores, saved, 32, 1e4)


def time_tile_groups(inputs) -> None:
    """Forward and backward ms (median of do_bench) per order of each kernel's programs, the default first and last
    (its two timings bracket any drift); every setting's output and dx checked against the default's."""
    x, w_qkv, w_o, w_router, indices, scores, dy = inputs
    default, default_tiles = dict(tm.TILE_GROUP), dict(tm.SPLIT_TILES)
    y0, saved = tm.mosa_fwd(x, w_qkv, w_o, indices, scores, 32, 1e4)
    dx0 = tm.mosa_bwd(dy, x, w_qkv, w_o, w_router, indices, scores, saved, 32, 1e4)[0]
    default_output = tm.SPLIT_OUTPUT_KERNEL
    settings = [("default", default, default_tiles, default_output)] + [
        (f"{kernel} {group}", {**default, kernel: group}, default_tiles, default_output)
        for kernel in ("qkv", "fwd", "bwd_rows", "dx") for group in (1, 2, 4, 0) if group != default[kernel]] + [
        (f"dx {group}, 256-row tiles", {**default, "dx": group}, {**default_tiles, "dx": (256, 8, 3)}, default_output)
        for group in (1, 2, 0)] + [
        (f"output kernel {not default_output}, out {group}", {**default, "out": group}, default_tiles,
         not default_output) for group in (1, 2, 0)]
    print(f"default {default}, split tiles {default_tiles}, output kernel {default_output}")
    print("| setting | forward ms | backward ms | max diff y | max diff dx |\n|---|---|---|---|---|")
    for label, setting, tiles, output_kernel in settings + [settings[0]]:
        tm.TILE_GROUP.update(setting)
        tm.SPLIT_TILES.update(tiles)
        tm.SPLIT_OUTPUT_KERNEL = output_kernel
        y, saved = tm.mosa_fwd(x, w_qkv, w_o, indices, scores, 32, 1e4)
        dx = tm.mosa_bwd(dy, x, w_qkv, w_o, w_router, indices, scores, saved, 32, 1e4)[0]
        fwd = triton.testing.do_bench(lambda: tm.mosa_fwd(x, w_qkv, w_o, indices, scores, 32, 1e4),
                                      return_mode="median")
        bwd = triton.testing.do_bench(
            lambda: tm.mosa_bwd(dy, x, w_qkv, w_o, w_router, indices, scores, saved, 32, 1e4), return_mode="median")
        y_diff = (y.float() - y0.float()).abs().max().item()
        dx_diff = (dx.float() - dx0.float()).abs().max().item()
        print(f"| {label} | {fwd:.3f} | {bwd:.3f} | {y_diff:.1e} | {dx_diff:.1e} |", flush=True)
    tm.TILE_GROUP.update(default)
    tm.SPLIT_TILES.update(default_tiles)
    tm.SPLIT_OUTPUT_KERNEL = default_output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["A", "B"], choices=sorted(SHAPES))
    parser.add_argument("--tile-groups", action="store_true")
    args = parser.parse_args()
    for name in args.cases:
        inputs = op_inputs(*SHAPES[name])
        step(*inputs)
        torch.cuda.synchronize()
        if os.environ.get("PROFILE") == "1":
            step(*inputs)  # the launches Nsight Compute profiles (the first step compiled the kernels)
            torch.cuda.synchronize()
            continue
        for _ in range(3):
            step(*inputs)
        steps = 10
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(*inputs)
            torch.cuda.synchronize()
        per_name = collections.defaultdict(float)
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                per_name[event.name] += event.device_time / steps / 1e3
        print(f"\n## case {name} {SHAPES[name]} (B, T, h, E, k): op forward + backward, "
              f"{sum(per_name.values()):.3f} ms of kernels")
        print("| kernel | ms |\n|---|---|")
        for kernel, ms in sorted(per_name.items(), key=lambda item: -item[1])[:14]:
            print(f"| {kernel[:80]} | {ms:.3f} |")
        if args.tile_groups:
            time_tile_groups(inputs)
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
