"""Selections wider than the row kernels take (k > 128): the reference's composition in float32 (what they ran
until session 7), the same composition in the inputs' bf16 dtype (`mosa_attention_composed`: bf16 GEMMs and flash
SDPA, heads summed in fp32; sessions 7-12) and the wide path (session 13: the split path's kernels around PyTorch's
attention, `fused_mosa_attention`), op forward + backward with the router gradient inside, and peak memory.

Shapes: the MoSA heads of a Tiny layer (h 512, d 64, T 1024, B 64) at sparsity 4 (k 256, the IsoFLOP 31 heads
beside 4 dense) and 2 (k 512, 13 heads), and 23 heads of k = 1024 over T = 4096 at B 8 (issue 10's "k up to at
least 1024").

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/large_k_composition.py`; `--cpu` runs a tiny
case on the CPU for the correctness check only (no timing; the wide path in Triton's interpreter, float16 there
since the interpreter computes bfloat16 dots wrongly).
"""

import argparse

import torch

from torch_mosa.ops.mosa.reference import mosa_attention_composed, mosa_attention_reference
from torch_mosa.ops.mosa.triton_mosa import fused_mosa_attention
from torch_mosa.ops.selection.reference import topk_route_reference

SHAPES = [  # name, batch, seq_len, hidden, heads, k
    ("sparsity 4 (k 256)", 64, 1024, 512, 31, 256),
    ("sparsity 2 (k 512)", 64, 1024, 512, 13, 512),
    ("k 1024, T 4096", 8, 4096, 512, 23, 1024),
]
TINY = [("tiny", 2, 300, 48, 3, 150)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.cpu else "cuda"
    half = torch.float16 if args.cpu else torch.bfloat16
    rows = []
    for name, batch, seq_len, hidden, heads, k in TINY if args.cpu else SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, seq_len, hidden, generator=g).to(device, half)
        w_qkv = (torch.randn(heads, hidden, 192, generator=g) / hidden ** 0.5).to(device, half)
        w_o = (torch.randn(heads, 64, hidden, generator=g) / 8).to(device, half)
        w_r = (torch.randn(heads, hidden, generator=g) / hidden ** 0.5).to(device, half)
        grad_y = torch.randn(batch, seq_len, hidden, generator=g).to(device, half)
        indices, scores = topk_route_reference(torch.einsum("eh,bth->bet", w_r.float(), x.float()), k, True)
        leaves = [t.detach().requires_grad_() for t in (x, w_qkv, w_o, w_r)]
        results = {}
        paths = (("float32 reference", mosa_attention_reference), ("16-bit composition", mosa_attention_composed),
                 ("16-bit wide kernels", fused_mosa_attention))
        for label, op in paths:
            def step():
                for leaf in leaves:
                    leaf.grad = None
                op(leaves[0], leaves[1], leaves[2], indices, scores.to(half), 32, 1e4,
                   router_weight=leaves[3]).backward(grad_y)

            step()
            results[label] = [leaf.grad.clone() for leaf in leaves]
            ms = peak = float("nan")
            if not args.cpu:
                import triton

                torch.cuda.reset_peak_memory_stats()
                step()
                peak = torch.cuda.max_memory_allocated() / 2 ** 20
                ms = triton.testing.do_bench(step, return_mode="median")
            rows.append((name, label, ms, peak))
            print(f"{name}, {label}: {ms:.3f} ms, peak {peak:.0f} MiB", flush=True)
        for label in ("16-bit composition", "16-bit wide kernels"):
            error = max(((a.double() - b.double()).norm() / b.double().norm()).item()
                        for a, b in zip(results[label], results["float32 reference"]))
            print(f"{name}: largest relative gradient difference, {label} vs float32 reference {error:.1e}",
                  flush=True)
    print("\n| shape | path | fwd+bwd ms | peak MiB |\n|---|---|---|---|")
    for name, label, ms, peak in rows:
        print(f"| {name} | {label} | {ms:.3f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
