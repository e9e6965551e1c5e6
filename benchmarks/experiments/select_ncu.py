"""One launch of the top-k selection kernel per warp count on SPEC §6 case A's router logits ([64, 505, 1024] fp32,
k 16, include_first), for Nsight Compute to profile (the kernel took 0.40-0.43 ms per layer in the compiled layer
and training step, against about 0.04 ms to read its 132 MB of logits once).

On the GPU machine: `PROFILE=1 ncu --kernel-name _topk_route_kernel --section SpeedOfLight --section Occupancy
--section WarpStateStats ... python benchmarks/experiments/select_ncu.py` (PYTHONPATH=src): one launch per warp
count. Without PROFILE=1 it prints each variant's time instead.
"""
import os

import torch
import triton.testing

from torch_mosa.ops.selection import triton_selection as ts

logits = torch.randn(64, 505, 1024, device="cuda")
default_blocks = ts._row_blocks
for warps in (1, 2, 4):
    ts._row_blocks = lambda seq_len, warps=warps: {**default_blocks(seq_len), "num_warps": warps}
    ts.topk_route_triton(logits, 16, True)  # one launch per variant under ncu (PROFILE=1)
    torch.cuda.synchronize()
    if os.environ.get("PROFILE") != "1":
        ms = triton.testing.do_bench(lambda: ts.topk_route_triton(logits, 16, True), return_mode="median")
        print(f"{warps} warps: {ms * 1e3:.1f} us", flush=True)
ts._row_blocks = default_blocks
