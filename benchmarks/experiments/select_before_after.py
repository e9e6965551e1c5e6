"""The top-k selection kernel before and after a change, timed in one process on a GPU, each at 1, 2 and 4 warps, on
the router logits of SPEC §6 cases A (k 16) and B (k 64): [64, E, 1024] fp32, include_first. The "before" kernel is
a copy of the module at an earlier commit with its custom ops renamed (`git show REV:src/torch_mosa/ops/selection/
triton_selection.py`, `torch_mosa::` -> `torch_mosa_before::`), given as BEFORE_FILE. Every variant's indices and
scores must equal the current default's.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/select_before_after.py BEFORE_FILE`.
"""
import importlib.util
import sys

import torch
import triton.testing

from torch_mosa.ops.selection import triton_selection as after


def main() -> int:
    spec = importlib.util.spec_from_file_location("selection_before", sys.argv[1])
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    bad = 0
    print("| case | kernel | warps | us per call | equal to the current default |")
    print("|---|---|---|---|---|")
    for case, heads, k in (("A", 505, 16), ("B", 142, 64)):
        logits = torch.randn(64, heads, 1024, device="cuda")
        expected = after.topk_route_triton(logits, k, True)
        for label, module in (("before", before), ("after", after)):
            default_blocks = module._row_blocks
            for warps in (None, 1, 2, 4):
                if warps is not None:
                    module._row_blocks = lambda n, w=warps, f=default_blocks: {**f(n), "num_warps": w}
                got = module.topk_route_triton(logits, k, True)
                equal = torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
                bad += not equal
                us = triton.testing.do_bench(lambda: module.topk_route_triton(logits, k, True),
                                             return_mode="median") * 1e3
                module._row_blocks = default_blocks
                print(f"| {case} | {label} | {warps or 'default'} | {us:.1f} | {equal} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
