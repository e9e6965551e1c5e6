"""The MoSA op's kernels one by one at SPEC §6 cases A, B and C's shapes: GPU time per kernel (torch.profiler over
forward + backward, bf16, router gradient inside) and, under Nsight Compute, one launch of each for its memory
traffic (DRAM bytes, L2 hit rate) and throughput, to tell the kernels bound by the scatter's fp32 atomics from
those bound by their dots.

On the GPU machine (PYTHONPATH=src): `python benchmarks/experiments/op_kernels_ncu.py` prints the per-kernel
table; with PROFILE=1 it runs forward + backward twice (the first compiles) for Nsight Compute to profile the second's
five kernels (`bash benchmarks/gpu_checklist.sh variants` has the ncu command).
`--variants` also times the forward and the backward with one change at a time: each kernel's programs in other
orders (`triton_mosa.TILE_GROUP`: runs of 1, 2, 4 tiles or all of them, every head over a run before the next), the
dx kernel with 256-row tiles (half the runs, so half the weight reads at one tile per run), the split forward's
output projection in a kernel of its own (`SPLIT_OUTPUT_KERNEL`) per order, the weight gradients in two launches
(`WEIGHTS_SPLIT`) per tile setting, and the row kernels at 128 rows x 8 warps and 64 x 8.
"""

import argparse
import os

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from profile_train_step import kernel_times
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


def variants() -> list:
    """(label, {triton_mosa attribute: value}) per setting timed by `--variants`, one change from the defaults each."""
    order, tiles = tm.TILE_GROUP, tm.SPLIT_TILES
    settings = [(f"order {kernel} {group}", {"TILE_GROUP": {**order, kernel: group}})
                for kernel in ("qkv", "fwd", "bwd_rows", "dx") for group in (1, 2, 4, 0) if group != order[kernel]]
    settings += [(f"order dx {group}, 256-row dx tiles", {"TILE_GROUP": {**order, "dx": group},
                                                          "SPLIT_TILES": {**tiles, "dx": (256, 8, 3)}})
                 for group in (1, 2, 0)]
    settings += [(f"output kernel, order out {group}", {"SPLIT_OUTPUT_KERNEL": True,
                                                        "TILE_GROUP": {**order, "out": group}}) for group in (1, 2, 0)]
    for qkv_tiles in ((128, 32, 8), (128, 64, 8), (64, 64, 4)):
        for o_tiles in ((128, 64, 8), (256, 64, 8)):
            setting = {"qkv": dict(zip(("BH", "BLOCK_R", "num_warps"), qkv_tiles), num_stages=None),
                       "o": dict(zip(("BH", "BLOCK_R", "num_warps"), o_tiles), num_stages=None)}
            settings.append((f"weights split, qkv {qkv_tiles}, o {o_tiles}",
                             {"WEIGHTS_SPLIT": True, "WEIGHTS_SPLIT_TILES": setting}))
    tile_config = tm._tile_config

    def row_tiles(block_m, warps, stages):
        def config(batch, k, head_dim, rotary_dim, dtype):
            cfg = tile_config(batch, k, head_dim, rotary_dim, dtype)
            if k > block_m or dtype == torch.float32:
                return cfg
            groups = block_m // k
            return {**cfg, "block_m": block_m, "groups": groups, "num_tiles": -(-batch // groups),
                    "num_warps": warps, "num_stages": stages}
        return config

    # the row kernels' tiles: the backward's (and the forward's where it takes the backward's: k > 16). ptxas
    # sm_90a, split path, case A widths: the backward row kernel spills 596 / 1072 bytes at 64 x 4 warps (the
    # default), 1048 / 1548 at 128 x 8, none at 64 x 8
    settings.append(("row tiles 128 x 8 warps", {"_tile_config": row_tiles(128, 8, 2)}))
    settings.append(("row tiles 64 x 8 warps", {"_tile_config": row_tiles(64, 8, 3)}))
    return settings


def time_variants(inputs) -> None:
    """Forward and backward ms (median of do_bench) of the op with each of `variants()`, the defaults first and
    last (their two timings bracket any drift); every setting's output and gradients checked against the defaults'."""
    x, w_qkv, w_o, w_router, indices, scores, dy = inputs
    settings = variants()
    defaults = {name: getattr(tm, name) for _, changes in settings for name in changes}
    y0, saved = tm.mosa_fwd(x, w_qkv, w_o, indices, scores, 32, 1e4)
    grads0 = tm.mosa_bwd(dy, x, w_qkv, w_o, w_router, indices, scores, saved, 32, 1e4)
    print(f"defaults {defaults}")
    print("| setting | forward ms | backward ms | max diff y | max diff dx, dW_QKV, dW_O, dW_router |\n"
          "|---|---|---|---|---|")
    for label, changes in [("defaults", {})] + settings + [("defaults", {})]:
        for name, value in {**defaults, **changes}.items():
            setattr(tm, name, value)
        y, saved = tm.mosa_fwd(x, w_qkv, w_o, indices, scores, 32, 1e4)
        grads = tm.mosa_bwd(dy, x, w_qkv, w_o, w_router, indices, scores, saved, 32, 1e4)
        fwd = triton.testing.do_bench(lambda: tm.mosa_fwd(x, w_qkv, w_o, indices, scores, 32, 1e4),
                                      return_mode="median")
        bwd = triton.testing.do_bench(
            lambda: tm.mosa_bwd(dy, x, w_qkv, w_o, w_router, indices, scores, saved, 32, 1e4), return_mode="median")
        y_diff = (y.float() - y0.float()).abs().max().item()
        grad_diffs = ", ".join(f"{(g.float() - g0.float()).abs().max().item():.1e}" for g, g0 in zip(grads, grads0))
        print(f"| {label} | {fwd:.3f} | {bwd:.3f} | {y_diff:.1e} | {grad_diffs} |", flush=True)
    for name, value in defaults.items():
        setattr(tm, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["A", "B"], choices=sorted(SHAPES))
    parser.add_argument("--variants", action="store_true", help="also time the op with each of variants()")
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
        per_name = {name: ms for name, (_, ms) in kernel_times(prof, steps).items()}
        print(f"\n## case {name} {SHAPES[name]} (B, T, h, E, k): op forward + backward, "
              f"{sum(per_name.values()):.3f} ms of kernels")
        print("| kernel | ms |\n|---|---|")
        for kernel, ms in sorted(per_name.items(), key=lambda item: -item[1])[:14]:
            print(f"| {kernel[:80]} | {ms:.3f} |")
        if args.variants:
            time_variants(inputs)
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
