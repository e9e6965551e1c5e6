"""Registers and spills of the fused row kernels for sm_90, without a GPU: Triton compiles each configuration to
PTX, `ptxas -v -arch=sm_90a` (CUDA 13.0 here) reports registers per thread and spill bytes.

Run on any machine with Triton and ptxas: `PYTHONPATH=src python benchmarks/experiments/register_spills.py`.
`--weights-dtype` instead compares the split path's kernels (the default from k = 16) with bf16 and with fp32 weight
pointers, as session 12's switch `FLOAT32_WEIGHTS_UNDER_AUTOCAST` gave them (removed in session 13: slower on an H100;
the op now rounds wider weights to x's dtype before its kernels). `--wide`: the wide path's kernels (session 13).
`--variants`: session 14's untimed settings (program orders, output kernel, weights split, selection by sort).
The shapes are SPEC §6 case A's (h 512, d 64, rotary 32, bf16). Spills are per thread, so configurations with more
warps spread the same tile over more registers.
"""

import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from torch_mosa.ops.mosa import triton_mosa as tm

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = dict(x_ptr="*bf16", w_qkv_ptr="*bf16", w_o_ptr="*bf16", idx_ptr="*i64", score_ptr="*fp32",
                cos_ptr="*fp32", sin_ptr="*fp32", rope_pos_ptr="*i32", doc_ptr="*i32", dest_ptr="*i64",
                y_ptr="*fp32", o_ptr="*bf16", qkv_ptr="*bf16", w_router_ptr="*bf16", dy_ptr="*bf16", dqkv_ptr="*bf16",
                dx_ptr="*fp32", dscore_ptr="*fp32", sm_scale="fp32")


def ptxas_usage(kernel, constants: dict, num_warps: int, pointers=None) -> tuple[int, int, int]:
    """(registers per thread, spill store bytes, spill load bytes) of `kernel` compiled with `constants`
    (`pointers` overrides POINTERS' argument types)."""
    names = list(kernel.arg_names)
    # the order of a kernel's (tile, head) programs (triton_mosa.TILE_GROUP) and the forward row kernel's own output
    # projection, at their defaults unless given
    constants = {**{n: v for n, v in (("TILE_GROUP", 0), ("SCATTER", True)) if n in names}, **constants}
    types = {**POINTERS, **(pointers or {})}
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    constexprs = {(names.index(n),): v for n, v in constants.items()}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET,
                              options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run(["ptxas", "-arch=sm_90a", "-v", ptx.name, "-o", "/dev/null"], capture_output=True,
                                text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report).groups())
    return registers, stores, loads


def main() -> None:
    print(f"{'kernel':10} {'rows':>4} {'warps':>5} {'BH':>3} {'docs':>5} {'split':>5} {'regs':>5} {'spill st':>9} "
          f"{'spill ld':>9}")
    for block_m, warps in ((64, 4), (64, 8), (128, 8)):
        for block_h in (64, 32):
            for docs in (False, True):
                for split in (False, True):
                    constants = dict(H=512, D=64, R2=16, BLOCK_M=block_m, BR=16, BP=32, BD=64, BH=block_h,
                                     PREC="tf32", DOCS=docs, SLOTS=False, SPLIT=split)
                    for name, kernel, extra in (("fwd", tm._mosa_fwd_kernel, {}),
                                                ("bwd rows", tm._mosa_bwd_rows_kernel, dict(ROUTER=True))):
                        regs, stores, loads = ptxas_usage(kernel, {**constants, **extra}, warps)
                        print(f"{name:10} {block_m:4} {warps:5} {block_h:3} {str(docs):>5} {str(split):>5} {regs:5} "
                              f"{stores:9} {loads:9}")
    # the split path's GEMM kernels
    for block_m, warps in ((64, 4), (128, 4), (128, 8)):
        for name, kernel, constants in (
                ("qkv", tm._mosa_qkv_kernel, dict(H=512, D=64, BLOCK_M=block_m, BD=64, BH=64, PREC="tf32")),
                ("dx", tm._mosa_bwd_dx_kernel, dict(H=512, D=64, BLOCK_M=block_m, BD=64, BH=64, PREC="tf32",
                                                    ROUTER=True, SLOTS=False))):
            regs, stores, loads = ptxas_usage(kernel, constants, warps)
            print(f"{name:10} {block_m:4} {warps:5} {64:3} {'-':>5} {'-':>5} {regs:5} {stores:9} {loads:9}")


def weights_dtype() -> None:
    """The split path's kernels (case A tiles) with bf16 against fp32 weights (and fp32 weight gradients)."""
    fp32 = dict(w_qkv_ptr="*fp32", w_o_ptr="*fp32", w_router_ptr="*fp32", dw_qkv_ptr="*fp32", dw_o_ptr="*fp32",
                dw_router_ptr="*fp32", dlogit_ptr="*fp32")
    bf16 = dict(dw_qkv_ptr="*bf16", dw_o_ptr="*bf16", dw_router_ptr="*bf16", dlogit_ptr="*fp32")
    rows = dict(H=512, D=64, R2=16, BR=16, BP=32, BD=64, BH=64, PREC="tf32", DOCS=False, SLOTS=False, SPLIT=True)
    kernels = (
        ("qkv", tm._mosa_qkv_kernel, dict(H=512, D=64, BLOCK_M=128, BD=64, BH=64, PREC="tf32"), 8),
        ("fwd rows", tm._mosa_fwd_kernel, dict(rows, BLOCK_M=128), 8),
        ("bwd rows", tm._mosa_bwd_rows_kernel, dict(rows, BLOCK_M=64, ROUTER=True), 4),
        ("dx", tm._mosa_bwd_dx_kernel, dict(H=512, D=64, BLOCK_M=128, BD=64, BH=64, PREC="tf32", ROUTER=True,
                                            SLOTS=False), 8),
        ("weights", tm._mosa_bwd_weights_kernel, dict(H=512, ROWS_BOUND=0, D=64, BLOCK_R=64, BD=64, BH=64,
                                                      PREC="tf32", ROUTER=True), 4))
    print(f"{'kernel':10} {'warps':>5} {'weights':>7} {'regs':>5} {'spill st':>9} {'spill ld':>9}")
    for name, kernel, constants, warps in kernels:
        for label, pointers in (("bf16", bf16), ("fp32", fp32)):
            regs, stores, loads = ptxas_usage(kernel, constants, warps, pointers)
            print(f"{name:10} {warps:5} {label:>7} {regs:5} {stores:9} {loads:9}")


def wide_kernels() -> None:
    """The wide path's kernels (session 13) at case A's widths: the RoPE kernel per tile setting and rotary width,
    the output kernel (atomics and deterministic) and the backward output kernel."""
    rope_pointers = dict(src_ptr="*bf16", dst_ptr="*bf16", pos_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32")
    print(f"{'kernel':10} {'rows':>4} {'warps':>5} {'R2':>3} {'regs':>5} {'spill st':>9} {'spill ld':>9}")
    for block_m, warps in ((32, 4), (64, 4), (128, 4), (128, 8)):
        for r2, bp in ((16, 32), (0, 64), (32, 16)):
            constants = dict(D=64, R2=r2, BLOCK_M=block_m, BR=max(16, r2), BP=bp, INVERSE=False)
            regs, stores, loads = ptxas_usage(tm._rope_rows_kernel, constants, warps, rope_pointers)
            print(f"{'rope':10} {block_m:4} {warps:5} {r2:3} {regs:5} {stores:9} {loads:9}")
    out = dict(H=512, D=64, BLOCK_M=128, BD=64, BH=64, PREC="tf32")
    for name, kernel, constants, pointers in (
            ("out", tm._mosa_out_kernel, dict(out, SLOTS=False), {}),
            ("out slots", tm._mosa_out_kernel, dict(out, SLOTS=True), dict(y_ptr="*bf16")),
            ("bwd out", tm._mosa_bwd_out_kernel, dict(out, ROUTER=True), dict(do_ptr="*bf16"))):
        regs, stores, loads = ptxas_usage(kernel, constants, 8, dict(pointers, score_ptr="*fp32"))
        print(f"{name:10} {128:4} {8:5} {'-':>3} {regs:5} {stores:9} {loads:9}")


def variants() -> None:
    """Session 14's untimed settings at case A's widths (split path, bf16): the forward row kernel with and without
    its output projection (`SPLIT_OUTPUT_KERNEL`) and per program order, the backward row kernel per tile, the dx
    kernel per order and tile, the weight kernel in one launch and in `WEIGHTS_SPLIT`'s two, and the selection
    kernel's search against its sort (`SELECT_BY_SORT`, 1024-logit rows)."""
    from torch_mosa.ops.selection import triton_selection as ts

    rows = dict(H=512, D=64, R2=16, BR=16, BP=32, BD=64, BH=64, PREC="tf32", DOCS=False, SLOTS=False, SPLIT=True)
    gemm = dict(H=512, D=64, BD=64, BH=64, PREC="tf32", ROUTER=True, SLOTS=False)
    weights = dict(H=512, ROWS_BOUND=0, D=64, BD=64, PREC="tf32", ROUTER=True)
    weight_pointers = dict(dw_qkv_ptr="*bf16", dw_o_ptr="*bf16", dw_router_ptr="*bf16", dlogit_ptr="*fp32")
    selection_pointers = dict(logits_ptr="*fp32", mask_ptr="*u8", first_ptr="*i64", idx_ptr="*i64",
                              score_ptr="*fp32", stride_lb="i64", stride_le="i64")
    settings = [(f"fwd rows, output projection {scatter}, order {group}", tm._mosa_fwd_kernel,
                 dict(rows, BLOCK_M=128, SCATTER=scatter, TILE_GROUP=group), 8, None)
                for scatter in (True, False) for group in (1, 0, 2)]
    settings += [(f"bwd rows, {block_m} rows", tm._mosa_bwd_rows_kernel, dict(rows, BLOCK_M=block_m, ROUTER=True),
                  warps, None) for block_m, warps in ((64, 4), (128, 8), (64, 8))]
    settings += [(f"dx, {block_m} rows, order {group}", tm._mosa_bwd_dx_kernel,
                  dict(gemm, BLOCK_M=block_m, TILE_GROUP=group), 8, None)
                 for block_m, group in ((128, 0), (128, 1), (128, 2), (256, 0))]
    settings += [("output kernel", tm._mosa_out_kernel,
                  dict(H=512, D=64, BD=64, BH=64, PREC="tf32", SLOTS=False, BLOCK_M=128, TILE_GROUP=0), 8,
                  dict(score_ptr="*fp32"))]
    for label, dw_qkv, dw_o, bh, block_r, warps in (
            ("weights, one launch", True, True, 64, 64, 4), ("weights split, dW_QKV", True, False, 128, 32, 8),
            ("weights split, dW_QKV", True, False, 128, 64, 8), ("weights split, dW_QKV", True, False, 64, 64, 4),
            ("weights split, dW_O", False, True, 128, 64, 8), ("weights split, dW_O", False, True, 256, 64, 8),
            ("weights split, dW_O", False, True, 128, 64, 4)):
        settings.append((f"{label}, {bh} columns x {block_r} rows", tm._mosa_bwd_weights_kernel,
                         dict(weights, BH=bh, BLOCK_R=block_r, DW_QKV=dw_qkv, DW_O=dw_o), warps, weight_pointers))
    for by_sort, kp in ((False, 1), (True, 16), (True, 64)):
        for warps in (1, 2, 4):
            settings.append((f"selection, {'sort, k ' + str(kp) if by_sort else 'search'}", ts._topk_route_kernel,
                             dict(HAS_MASK=False, INCLUDE_FIRST=True, BLOCK_T=1024, NUM_CHUNKS=1, KP=kp,
                                  BY_SORT=by_sort), warps, selection_pointers))
    print(f"{'kernel':48} {'warps':>5} {'regs':>5} {'spill st':>9} {'spill ld':>9}")
    for label, kernel, constants, warps, pointers in settings:
        regs, stores, loads = ptxas_usage(kernel, constants, warps, pointers)
        print(f"{label:48} {warps:5} {regs:5} {stores:9} {loads:9}", flush=True)


if __name__ == "__main__":
    if "--weights-dtype" in sys.argv[1:]:
        weights_dtype()
    elif "--wide" in sys.argv[1:]:
        wide_kernels()
    elif "--variants" in sys.argv[1:]:
        variants()
    else:
        main()
