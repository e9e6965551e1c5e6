"""Fingerprints of the decode kernels' sm_90 PTX, without a GPU: whether two versions of ops/decode/triton_decode.py
compile to the same code (debug line information and labels left out), so a refactor can be shown to leave what the
GPU runs unchanged when no device time is left to retest it.

Compiles the layer step's heads kernel (dense only, 4 + 17, MoSA only) and the sparse step's heads kernel (per pair
and grouped, a head list and all heads) at the Tiny shapes in bf16, and prints a hash of each PTX.

    PYTHONPATH=src python benchmarks/experiments/decode_ptx_fingerprint.py [FILE.py]   (default: the package's file)
    (an older version: git show COMMIT:src/torch_mosa/ops/decode/triton_decode.py > /tmp/old.py, then compare the
    two outputs)
"""

import hashlib
import importlib.util
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
DEFAULT = Path(__file__).resolve().parents[2] / "src" / "torch_mosa" / "ops" / "decode" / "triton_decode.py"
LAYER_POINTERS = dict(x_ptr="*bf16", dense_qkv_ptr="*bf16", dense_k_ptr="*bf16", dense_v_ptr="*bf16", real_ptr="*i1",
                      router_ptr="*bf16", thresholds_ptr="*bf16", w_qkv_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16",
                      counts_ptr="*i64", capacity_overflow_ptr="*i64", token_overflow_ptr="*i64", pos_ptr="*i64",
                      attended_ptr="*bf16", heads_ptr="*i64", written_ptr="*i8", log2_base="fp32")
SPARSE_POINTERS = dict(x_ptr="*bf16", qkv_ptr="*fp32", heads_ptr="*i64", joined_ptr="*i1", scores_ptr="*bf16",
                       pos_ptr="*i64", w_qkv_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", counts_ptr="*i64",
                       overflow_ptr="*i64", attended_ptr="*fp32", written_ptr="*i8", log2_base="fp32")


def fingerprint(kernel, constants: dict, pointers: dict, num_warps: int = 8) -> str:
    names = list(kernel.arg_names)
    signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in names}
    constexprs = {(names.index(n),): v for n, v in constants.items()}
    ptx = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET,
                         options={"num_warps": num_warps}).asm["ptx"]
    code = ptx.split(".section")[0]  # the debug sections follow the code
    code = "\n".join(line for line in code.splitlines()
                     if not re.match(r"\s*(\.loc|\.file|//|\$L__(tmp|func_begin|func_end)\d*:)", line))
    return hashlib.sha256(code.encode()).hexdigest()[:16]


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    spec = importlib.util.spec_from_file_location("triton_decode_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shape = dict(H=512, D=64, R2=16, BR=16, BP=32, BD=64, BH=128, BS=32)
    for name, dense_heads, capacity, block_e, mosa, mark in (("dense only", 9, 0, 16, False, True),
                                                             ("4 + 17", 4, 28, 32, True, True),
                                                             ("MoSA only, 64 heads", 0, 28, 64, True, False)):
        constants = dict(shape, J=5 if mosa else 0, L=392, BSD=128, ROUND_MARGIN=False, INTERPRET=False, HD=dense_heads, CAP=capacity,
                         BE=block_e, MOSA=mosa, MARK_REAL=mark)
        print(f"layer step, {name}: {fingerprint(module._layer_decode_heads_kernel, constants, LAYER_POINTERS)}")
    for grouped in (False, True):
        for all_heads in (False, True):
            constants = dict(shape, CAP=28, BJ=16, ALL_HEADS=all_heads, GROUPED=grouped, SLOTS_BOUND=0)
            print(f"sparse step, grouped={grouped}, all heads={all_heads}: "
                  f"{fingerprint(module._sparse_decode_heads_kernel, constants, SPARSE_POINTERS)}")


if __name__ == "__main__":
    main()
