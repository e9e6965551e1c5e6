"""Per-kernel timing of the fused MoSA op at a SPEC §6 case's shapes, for a few tile configurations.

`PYTHONPATH=src python benchmarks/profile_mosa_kernels.py --case A` prints, per configuration: ms of the forward
kernel, the backward row kernel, the backward weight kernel and the whole op forward+backward, plus registers and
spills of each kernel. Random bf16 data, median of triton.testing.do_bench.
"""

import argparse

import torch
import triton.testing

from torch_mosa.ops.mosa import triton_mosa as tm

SHAPES = {"A": (64, 1024, 512, 505, 16), "B": (64, 1024, 512, 142, 64), "C": (16, 1024, 1024, 381, 16),
          "D": (1, 131072, 1024, 60, 64)}


def random_selection(batch, seq_len, heads, k, device):
    scores = torch.rand(batch, heads, seq_len, device=device)
    indices = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    return indices, torch.rand(batch, heads, k, device=device)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="A", choices=sorted(SHAPES))
    args = parser.parse_args()
    batch, seq_len, hidden, heads, k = SHAPES[args.case]
    device, dt, d, rot = torch.device("cuda"), torch.bfloat16, 64, 32
    x = torch.randn(batch, seq_len, hidden, device=device, dtype=dt)
    w_qkv = (torch.randn(heads, hidden, 3 * d, device=device) / hidden ** 0.5).to(dt)
    w_o = (torch.randn(heads, d, hidden, device=device) / d ** 0.5).to(dt)
    indices, scores = random_selection(batch, seq_len, heads, k, device)
    dy = torch.randn_like(x)
    base_config = tm._tile_config
    print(f"case {args.case}: B={batch} T={seq_len} h={hidden} E={heads} k={k}")
    for block_m, warps, block_h in ((64, 4, 64), (128, 8, 64), (64, 4, 32)):
        if block_m < k:
            continue

        def config(batch_, k_, head_dim, rotary_dim, dtype, block_m=block_m, warps=warps, block_h=block_h):
            cfg = base_config(batch_, k_, head_dim, rotary_dim, dtype)
            groups = block_m // k_
            return {**cfg, "block_m": block_m, "groups": groups, "num_tiles": triton.cdiv(batch_, groups),
                    "num_warps": warps, "BH": block_h}

        tm._tile_config, tm.BLOCK_H = config, block_h
        try:
            y, o = tm.mosa_fwd(x, w_qkv, w_o, indices, scores, rot, 1e4)
            fwd = triton.testing.do_bench(lambda: tm.mosa_fwd(x, w_qkv, w_o, indices, scores, rot, 1e4),
                                          return_mode="median")
            bwd = triton.testing.do_bench(lambda: tm.mosa_bwd(dy, x, w_qkv, w_o, None, indices, scores, o, rot, 1e4),
                                          return_mode="median")
        except Exception as error:  # a configuration that does not compile (shared memory) is reported, not fatal
            print(f"BLOCK_M={block_m} warps={warps} BLOCK_H={block_h}: failed {type(error).__name__}: {error}"[:300])
            continue
        kernels = []
        for kernel in (tm._mosa_fwd_kernel, tm._mosa_bwd_rows_kernel, tm._mosa_bwd_weights_kernel):
            try:
                compiled = list(kernel.device_caches[0][0].values())[-1]
                kernels.append(f"{kernel.fn.__name__[6:-7]} regs={compiled.n_regs} spills={compiled.n_spills}")
            except (KeyError, IndexError, AttributeError) as error:
                kernels.append(f"{kernel.fn.__name__}: no compile info ({error!r})")
        print(f"BLOCK_M={block_m:3d} warps={warps} BLOCK_H={block_h:3d}: fwd {fwd:.3f} ms  bwd {bwd:.3f} ms  "
              f"total {fwd + bwd:.3f} ms | " + ", ".join(kernels), flush=True)
    tm._tile_config, tm.BLOCK_H = base_config, 64
    profile_layer(args.case)


def profile_layer(name):
    """torch.profiler breakdown of one forward+backward of the whole hybrid layer (fast path) for the case."""
    from torch_mosa.bench.cases import CASES, _layers, case_inputs

    case = CASES[name][-1 if name != "D" else 3]
    mosa, _ = _layers(case, torch.device("cuda"))
    x, grad_y = case_inputs(case, "cuda")
    for _ in range(3):
        mosa(x).backward(grad_y)
    torch.cuda.synchronize()
    import time

    start = time.perf_counter()
    for _ in range(20):
        mosa(x).backward(grad_y)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / 20 * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            mosa(x).backward(grad_y)
        torch.cuda.synchronize()
    kernels_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e3
    print(f"layer profile {case.name}: wall {wall_ms:.3f} ms/iter, GPU kernels {kernels_ms:.3f} ms/iter "
          "(5 iterations; table totals are over all 5)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
