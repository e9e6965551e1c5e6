"""The top-k selection kernel's search for the k-th key, by digit width and warps per row (issue 10).

A compiled Tiny training step spends 0.40 ms per MoSA layer in `_topk_route_kernel` at sparsity 64 (32,320 rows of
1,024 fp32 logits: about 0.17 TB/s; results/profile-train-step-h100-2026-11-23.txt). A row held in registers was
searched a bit at a time: 32 dependent counts, each a reduction across the row's warps. SELECT_DIGIT_BITS = 2 or
4 searches 2 or 4 bits per step (16 or 8 steps, counting 4 or 16 candidates at once), and SELECT_WARPS sets the
warps per row. This times every combination on the Tiny models' selections (B=64 x 1024, fp32 logits in the
router's [B, E, T] layout) with do_bench, each checked equal to the bitwise default, and prints a table.

GPU: `PYTHONPATH=src python benchmarks/experiments/select_digits.py`. Without a GPU, `--ptxas` prints each
combination's registers and spills for sm_90 (Triton's PTX through `ptxas -v`, as register_spills.py does).
"""

import argparse
import itertools

import torch

from torch_mosa.ops.selection import router_logits
from torch_mosa.ops.selection import triton_selection as ts

# (model, heads E, k) at B=64, T=1024
SHAPES = (("sparsity 64 (4 + 505)", 505, 16), ("sparsity 16 (4 + 142)", 142, 64), ("4 + 17, sparsity 32", 17, 32))
CHOICES = list(itertools.product((1, 2, 4), (1, 2, 4, 8)))  # (digit bits, warps)


def timed(logits, k, bits, warps):
    from triton.testing import do_bench

    ts.SELECT_DIGIT_BITS, ts.SELECT_WARPS = bits, warps
    result = ts.topk_route_triton(logits, k, True)
    return result, do_bench(lambda: ts.topk_route_triton(logits, k, True), warmup=25, rep=200)


def gpu() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for name, heads, k in SHAPES:
        x = torch.randn(64, 1024, 512, device="cuda")
        weight = torch.randn(heads, 512, device="cuda") / 512 ** 0.5
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = router_logits(x, weight)  # fp32 [B, E, T], the training step's layout and ties
        (expected_idx, expected_scores), base_ms = timed(logits, k, 1, None)
        rows.append((name, "1 (default)", "default", base_ms, True))
        for bits, warps in CHOICES:
            (idx, scores), ms = timed(logits, k, bits, warps)
            same = torch.equal(idx, expected_idx) and torch.equal(scores, expected_scores)
            rows.append((name, bits, warps, ms, same))
            print(f"{name}: bits {bits} warps {warps}: {ms * 1e3:.1f} us, equal {same}", flush=True)
    print("\n| model | digit bits | warps | us per call | vs default | equal to default |\n|---|---|---|---|---|---|")
    base = {}
    for name, bits, warps, ms, same in rows:
        base.setdefault(name, ms)
        print(f"| {name} | {bits} | {warps} | {ms * 1e3:.1f} | {ms / base[name]:.2f}x | {same} |")


def registers() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from register_spills import POINTERS, ptxas_usage

    POINTERS.update(mask_ptr="*u8", first_ptr="*i64", score_ptr="*fp32", logits_ptr="*fp32")
    print(f"{'bits':>4} {'warps':>5} {'regs':>5} {'spill st':>9} {'spill ld':>9}")
    for bits, warps in CHOICES:
        constants = dict(HAS_MASK=False, INCLUDE_FIRST=True, BLOCK_T=1024, NUM_CHUNKS=1, DIGIT_BITS=bits)
        regs, stores, loads = ptxas_usage(ts._topk_route_kernel, constants, warps)
        print(f"{bits:4} {warps:5} {regs:5} {stores:9} {loads:9}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptxas", action="store_true", help="registers and spills for sm_90, no GPU needed")
    registers() if parser.parse_args().ptxas else gpu()
