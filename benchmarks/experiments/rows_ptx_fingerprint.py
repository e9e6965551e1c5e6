"""Fingerprints of the MoSA op's row kernels' sm_90 PTX, without a GPU: whether two versions of
ops/mosa/triton_mosa.py compile the forward and backward row kernels to the same code (debug lines and labels left
out; `decode_ptx_fingerprint.fingerprint`), so a refactor can be shown to leave what the GPU runs unchanged.

Case A's widths (h 512, d 64, rotary 32), 64-row tiles, bf16, every setting of split / packed documents / per-slot
rows, each kernel's default program order (a version with the program order as a setting adds two parameters to
the kernels' signatures, so its PTX never hashes like an older version's).

    PYTHONPATH=src python benchmarks/experiments/rows_ptx_fingerprint.py [FILE.py]   (default: the package's file)
    (an older version: git show COMMIT:src/torch_mosa/ops/mosa/triton_mosa.py > /tmp/old.py; the old file imports
    the package's other modules, so run both from the same checkout)
"""

import importlib.util
import sys
from pathlib import Path

from decode_ptx_fingerprint import fingerprint

DEFAULT = Path(__file__).resolve().parents[2] / "src" / "torch_mosa" / "ops" / "mosa" / "triton_mosa.py"
POINTERS = dict(x_ptr="*bf16", w_qkv_ptr="*bf16", w_o_ptr="*bf16", w_router_ptr="*bf16", idx_ptr="*i64",
                score_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", rope_pos_ptr="*i32", doc_ptr="*i32",
                dest_ptr="*i64", y_ptr="*fp32", o_ptr="*bf16", qkv_ptr="*bf16", dy_ptr="*bf16", dqkv_ptr="*bf16",
                dx_ptr="*fp32", dscore_ptr="*fp32", sm_scale="fp32")


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    spec = importlib.util.spec_from_file_location("triton_mosa_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for split in (False, True):
        for docs in (False, True):
            for slots in (False, True):
                constants = dict(H=512, D=64, R2=16, BLOCK_M=64, BR=16, BP=32, BD=64, BH=64, PREC="tf32", DOCS=docs,
                                 SLOTS=slots, SPLIT=split)
                # settings later versions added, at their defaults (program order: the module's TILE_GROUP)
                order = getattr(module, "TILE_GROUP", {})
                forward_extra = {n: v for n, v in (("TILE_GROUP", order.get("fwd")), ("SCATTER", True))
                                 if n in module._mosa_fwd_kernel.arg_names}
                backward_extra = {"TILE_GROUP": order["bwd_rows"]} if order else {}
                forward = fingerprint(module._mosa_fwd_kernel, {**constants, **forward_extra}, POINTERS, 4)
                backward = fingerprint(module._mosa_bwd_rows_kernel,
                                       {**constants, **backward_extra, "ROUTER": True}, POINTERS, 4)
                print(f"split={split} docs={docs} slots={slots}: forward {forward}, backward {backward}")


if __name__ == "__main__":
    main()
