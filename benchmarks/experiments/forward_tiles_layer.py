"""Does the forward's own tile choice (128 rows x 8 warps for 16-bit k <= 16) pay in the whole layer, and is case C
bound by the host?

Session 4 gave the forward 128-row tiles for k <= 16 after the op alone ran faster with them (tile_sweep.py: case C
forward 0.57 -> 0.50 ms). The next layer table (results/layer-train-h100-2026-11-23-1756.md) had case C at 5.55 ms
against 4.69 ms before, A and B unchanged. This times each SPEC §6 case A-C layer (forward + backward, do_bench
median) with the forward's tiles and with the backward's tiles in the forward (the earlier behaviour), alternately in
one process, beside the dense layer; and the host's time to issue one step (no synchronisation inside), which, when
it is near the GPU time, says the layer waits on Python and launches rather than on kernels.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/forward_tiles_layer.py`.
"""

from torch_mosa.bench.cases import CASES, _layers, case_inputs, host_ms_per_step, time_layer
from torch_mosa.ops.mosa import triton_mosa


def main() -> None:
    own_tiles = triton_mosa._forward_tile_config
    rows = []
    for name in ("A", "B", "C"):
        case = CASES[name][0]
        mosa, dense = _layers(case, "cuda")
        x, grad_y = case_inputs(case, "cuda")
        dense_ms, _ = time_layer(dense, x, grad_y)
        for label, config in (("forward's own tiles", own_tiles), ("backward's tiles", triton_mosa._tile_config)):
            triton_mosa._forward_tile_config = config
            try:
                ms, peak = time_layer(mosa, x, grad_y)
                issued = host_ms_per_step(mosa, x, grad_y)
            finally:
                triton_mosa._forward_tile_config = own_tiles
            rows.append((name, label, ms, ms / dense_ms, issued, peak))
            print(f"{name} {label}: {ms:.3f} ms ({ms / dense_ms:.2f}x dense {dense_ms:.3f}), host {issued:.3f} ms "
                  f"per step, peak {peak:.0f} MiB", flush=True)
    print("\n| case | forward tiles | fwd+bwd ms | vs dense | host ms to issue a step | peak MiB |")
    print("|---|---|---|---|---|---|")
    for name, label, ms, ratio, issued, peak in rows:
        print(f"| {name} | {label} | {ms:.3f} | {ratio:.2f}x | {issued:.3f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
