"""The top-k selection kernel's bitwise search against its sort (`triton_selection.SELECT_BY_SORT`: `tl.topk` on
64-bit key|position words, then `tl.sort` of the k chosen into position order), per warp count, on the routers'
logits shapes of SPEC §6 cases A, B, C and of longer rows; each variant's output compared with the search's.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/select_by_sort.py`. The search takes 0.36-0.40 ms in
case A on an H100 (select-ncu-h100-2026-11-24-0836.log), against about 0.04 ms to read the logits once.
"""

import torch
import triton.testing

from torch_mosa.ops.selection import triton_selection as ts

SHAPES = [  # name, batch, heads, seq_len, k
    ("A: sparsity 64", 64, 505, 1024, 16),
    ("B: sparsity 16", 64, 142, 1024, 64),
    ("4 + 17: sparsity 32", 64, 17, 1024, 32),
    ("C: h 1024", 16, 381, 1024, 16),
    ("T 4096, k 64", 8, 60, 4096, 64),
]


def main() -> None:
    default_blocks = ts._row_blocks
    print("| shape | method | warps | us | equal to the search |\n|---|---|---|---|---|")
    for name, batch, heads, seq_len, k in SHAPES:
        logits = torch.randn(batch, heads, seq_len, device="cuda")
        logits[..., ::7] = logits[..., 3:4]  # ties around the k-th value, as the tests make them
        ts.SELECT_BY_SORT = False
        expected = ts.topk_route_triton(logits, k, True)
        for by_sort in (False, True):
            for warps in (None, 1, 2, 4, 8):
                ts.SELECT_BY_SORT = by_sort
                ts._row_blocks = (default_blocks if warps is None else
                                  lambda n, w=warps: {**default_blocks(n), "num_warps": w})
                try:
                    actual = ts.topk_route_triton(logits, k, True)
                    us = triton.testing.do_bench(lambda: ts.topk_route_triton(logits, k, True),
                                                 return_mode="median") * 1e3
                except Exception as error:  # a setting that does not compile is reported, not fatal
                    print(f"| {name} | {'sort' if by_sort else 'search'} | {warps} | failed: "
                          f"{type(error).__name__} {str(error)[:80]} | |", flush=True)
                    continue
                equal = all(torch.equal(a, b) for a, b in zip(actual, expected))
                print(f"| {name} | {'sort' if by_sort else 'search'} | {warps or 'default'} | {us:.1f} | {equal} |",
                      flush=True)
        ts._row_blocks = default_blocks
        ts.SELECT_BY_SORT = False


if __name__ == "__main__":
    main()
