"""Tile sweep of the MoSA op's weight-gradient kernel (`_mosa_bwd_weights_kernel`), on a GPU (issue 10).

Session 11's profile of the compiled Tiny training step (H100) put this kernel at 0.71 ms per layer at sparsity 64
(SPEC §6 case A's shapes) and 0.80 ms at sparsity 16 (case B): 150 GFLOP in case B, about 190 TFLOP/s. One program
per (head, hidden chunk of BH) walks the head's B*k rows in blocks of BLOCK_R and contracts the gathered x and dy
rows with dQ|dK|dV and O; every chunk's program reads the head's whole dQKV and O, so wider chunks read them fewer
times, and longer row blocks make longer dots. This script times the kernel alone (`do_bench`, median) for every
(BH, BLOCK_R, warps, stages) setting on random inputs of each case's shapes, checks each setting's dW_QKV, dW_O and
dW_router against the default setting's (16-bit accumulations differ only in order), and prints a table per case.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/weights_tiles.py --out DIR [--cases A B C]`.
`--dry-run` runs one tiny case and two settings on the CPU in Triton's interpreter (correctness only, no timing).
"""

import argparse
import itertools
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["A", "B", "C"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    from torch_mosa.bench.cases import CASES
    from torch_mosa.ops.mosa import triton_mosa as tm
    from torch_mosa.ops.selection.reference import topk_route_reference

    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float16 if args.dry_run else torch.bfloat16
    cases = [("tiny", 48, 3, 8, 37, 2, 16)] if args.dry_run else [
        (c.name, c.hidden, c.num_mosa_heads, c.k, c.seq_len, c.batch, 64) for name in args.cases for c in CASES[name]]
    default = (tm.WEIGHTS_TILES["BH"], tm.WEIGHTS_TILES["BLOCK_R"], tm.WEIGHTS_TILES["num_warps"],
               tm.WEIGHTS_TILES["num_stages"] or 3)  # the row kernels' 3 stages at these cases' k
    settings = [default, (32, 32, 4, 2)] if args.dry_run else [default] + [
        s for s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)) if s != default]
    rows = []
    for name, hidden, heads, k, seq_len, batch, head_dim in cases:
        g = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

        x, dy = rand(batch, seq_len, hidden), rand(batch, seq_len, hidden)
        indices, scores = topk_route_reference(torch.randn(batch, heads, seq_len, generator=g), k, True)
        indices, scores = indices.to(device), scores.to(device)
        dscores = torch.randn(batch, heads, k, generator=g).to(device)
        o, dqkv = rand(heads, batch * k, head_dim), rand(heads, batch * k, 3 * head_dim, scale=0.1)
        rows_bound = batch * k if args.dry_run else 0
        expected = None
        for bh, block_r, warps, stages in settings:
            dw_qkv = torch.empty(heads, hidden, 3 * head_dim, device=device, dtype=dtype)
            dw_o = torch.empty(heads, head_dim, hidden, device=device, dtype=dtype)
            dw_r = torch.empty(heads, hidden, device=device, dtype=dtype)

            def launch():
                tm._mosa_bwd_weights_kernel[(heads * triton.cdiv(hidden, bh),)](
                    x, dy, indices, scores, dscores, o, dqkv, dw_qkv, dw_o, dw_r, batch, seq_len, heads, k,
                    batch * k, H=hidden, ROWS_BOUND=rows_bound, D=head_dim, BLOCK_R=block_r, BD=tm._block(head_dim),
                    BH=bh, PREC=tm._dot_precision(dtype), ROUTER=True, num_warps=warps, num_stages=stages)
            row = dict(case=name, BH=bh, BLOCK_R=block_r, warps=warps, stages=stages)
            try:
                launch()
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as error:  # e.g. out of shared memory for this setting
                row.update(error=f"{type(error).__name__}: {str(error)[:120]}")
                rows.append(row)
                print(f"{name} {bh}x{block_r}x{warps}x{stages}: {row['error']}", flush=True)
                continue
            got = [t.clone() for t in (dw_qkv, dw_o, dw_r)]
            if expected is None:
                expected = got
            row["max_rel_diff"] = max(((a.double() - e.double()).norm() / e.double().norm()).item()
                                      for a, e in zip(got, expected))
            row["ms"] = float("nan") if args.dry_run else triton.testing.do_bench(launch, return_mode="median")
            flops = 2 * heads * batch * k * hidden * 4 * head_dim  # dW_QKV (3d) and dW_O (d) per row
            row["tflops"] = flops / row["ms"] / 1e9
            rows.append(row)
            print(f"{name} BH {bh} BLOCK_R {block_r} warps {warps} stages {stages}: {row['ms']:.3f} ms "
                  f"({row['tflops']:.0f} TFLOP/s), max relative difference {row['max_rel_diff']:.1e}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "weights-tiles.json"), "w") as f:
            json.dump(rows, f, indent=1)
    for name in dict.fromkeys(r["case"] for r in rows):
        timed = sorted((r for r in rows if r["case"] == name and "ms" in r), key=lambda r: r["ms"])
        base = [r["ms"] for r in timed if (r["BH"], r["BLOCK_R"], r["warps"], r["stages"]) == default]
        print(f"\n{name}: default setting {'x'.join(map(str, default))} {base[0] if base else float('nan'):.3f} ms")
        print("| BH | BLOCK_R | warps | stages | ms | TFLOP/s | max rel. diff. |")
        print("|---|---|---|---|---|---|---|")
        for r in timed[:8]:
            print(f"| {r['BH']} | {r['BLOCK_R']} | {r['warps']} | {r['stages']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                  f"{r['max_rel_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
