"""Tile configurations of the fused MoSA op, timed on a GPU: rows per tile x warps x hidden chunk.

benchmarks/experiments/register_spills.py found, for SPEC §6 case A's shapes in bf16, that today's 64 rows x 4 warps
x 64-wide hidden chunks spill 1.0 KB (forward) and 2.2-2.8 KB (backward rows) per thread, while 64 rows x 8 warps
x 32-wide chunks spill nothing forward and 0.13 KB backward. This script times the op (forward, and forward +
backward with the router gradient inside) for each configuration on the SPEC §6 cases, and checks each one against
the default configuration's output first. Each configuration is used by the forward and the backward kernels alike
(since this sweep, the forward's default differs for k <= 16: `triton_mosa._forward_tile_config`).

`--configs 64x4x64 128x8x64` limits the sweep to those configurations. (Session 7 timed a wide projection with it,
three N = d dots instead of seven per RoPE segment: slower, reverted; see KERNEL_NOTES.md.)

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/tile_sweep.py [--cases A B C]`.
`--dry-run` runs one tiny case per configuration on the CPU in Triton's interpreter (correctness only, no timing).
"""

import argparse
import os
import sys

CONFIGS = [  # rows per tile, warps, hidden chunk
    (64, 4, 64), (64, 8, 64), (64, 8, 32), (64, 4, 32), (128, 8, 64), (128, 8, 32),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["A", "B", "C"])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--configs", nargs="+", default=[f"{m}x{w}x{h}" for m, w, h in CONFIGS],
                        help="rows x warps x hidden chunk, e.g. 64x4x64")
    args = parser.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    from torch_mosa.bench.cases import CASES
    from torch_mosa.ops.mosa import triton_mosa as tm
    from torch_mosa.ops.selection.reference import topk_route_reference

    default_config = tm._tile_config
    default_forward_config = tm._forward_tile_config

    def use(config, forward_config):  # the forward and the backward kernels, both with the swept tiles
        tm._tile_config, tm._forward_tile_config = config, forward_config

    def configured(block_m, warps, block_h):
        def tile_config(batch, k, head_dim, rotary_dim, dtype):
            cfg = default_config(batch, k, head_dim, rotary_dim, dtype)
            rows = min(block_m, tm._block(batch * k))
            if rows < k:  # a tile holds whole (b, e) groups
                rows = cfg["block_m"]
            groups = rows // k
            return {**cfg, "block_m": rows, "groups": groups, "num_tiles": triton.cdiv(batch, groups),
                    "num_warps": warps, "BH": block_h}
        return tile_config

    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    cases = [("tiny", 48, 3, 8, 37, 2, 16)] if args.dry_run else [
        (c.name, c.hidden, c.num_mosa_heads, c.k, c.seq_len, c.batch, 64)
        for name in args.cases for c in CASES[name]]
    rows = []
    for name, hidden, heads, k, seq_len, batch, head_dim in cases:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, seq_len, hidden, generator=g).to(device, dtype)
        w_qkv = (torch.randn(heads, hidden, 3 * head_dim, generator=g) / hidden ** 0.5).to(device, dtype)
        w_o = (torch.randn(heads, head_dim, hidden, generator=g) / head_dim ** 0.5).to(device, dtype)
        w_r = (torch.randn(heads, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
        grad_y = torch.randn(batch, seq_len, hidden, generator=g).to(device, dtype)
        logits = torch.einsum("eh,bth->bet", w_r.float(), x.float())
        indices, scores = topk_route_reference(logits, k, True)
        leaves = [t.detach().requires_grad_() for t in (x, w_qkv, w_o, w_r)]

        def forward():
            return tm.fused_mosa_attention(leaves[0], leaves[1], leaves[2], indices, scores, head_dim // 2, 1e4,
                                           leaves[3])

        def forward_backward():
            for leaf in leaves:
                leaf.grad = None
            forward().backward(grad_y)

        use(default_config, default_forward_config)
        forward_backward()
        expected = [forward().detach()] + [leaf.grad.clone() for leaf in leaves]
        for block_m, warps, block_h in configs:
            swept = configured(block_m, warps, block_h)
            use(swept, swept)
            forward_backward()
            got = [forward().detach()] + [leaf.grad for leaf in leaves]
            errors = [((a.double() - e.double()).norm() / e.double().norm()).item() for a, e in zip(got, expected)]
            if args.dry_run:
                timing = (float("nan"), float("nan"))
            else:
                timing = (triton.testing.do_bench(forward, return_mode="median"),
                          triton.testing.do_bench(forward_backward, return_mode="median"))
            rows.append((name, block_m, warps, block_h, *timing, max(errors)))
            print(f"{name} rows={block_m} warps={warps} BH={block_h}: fwd {timing[0]:.3f} ms, fwd+bwd "
                  f"{timing[1]:.3f} ms, max relative difference to the default {max(errors):.1e}", flush=True)
        use(default_config, default_forward_config)
    print("\n| case | rows | warps | BH | fwd ms | fwd+bwd ms | max rel. diff. to default |")
    print("|---|---|---|---|---|---|---|")
    for name, block_m, warps, block_h, fwd, both, error in rows:
        print(f"| {name} | {block_m} | {warps} | {block_h} | {fwd:.3f} | {both:.3f} | {error:.1e} |")
    bad = [row for row in rows if not row[-1] < (1e-5 if args.dry_run else 2e-2)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
