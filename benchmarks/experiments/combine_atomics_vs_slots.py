"""The two ways the fused MoSA op sums heads into tokens, timed on a GPU: fp32 atomics (the default) against
per-slot rows summed token by token in slot order (`_combine_slots`, a segmented sum over a CSR of the slots: what
`torch.use_deterministic_algorithms(True)` runs; until 2026-11-23 17:50 UTC it was PyTorch's deterministic
`index_add_`, 4-6x slower than the atomics: results/combine-atomics-vs-slots-h100-2026-11-23.log).

For each SPEC §6 case A-C: the op's forward and forward + backward in each mode (median of triton's do_bench), peak
memory of one forward + backward, whether two deterministic runs are bitwise equal, and the largest relative
difference between the modes. Decides whether the fixed-order combine can become the default (issue 10 asks for
bitwise identical outputs run to run).

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/combine_atomics_vs_slots.py [--cases A B C]`.
"""

import argparse
import os


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["A", "B", "C"])
    args = parser.parse_args()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch
    import triton

    from torch_mosa.bench.cases import CASES
    from torch_mosa.ops.mosa import triton_mosa as tm
    from torch_mosa.ops.selection.reference import topk_route_reference

    rows = []
    for name in args.cases:
        case = CASES[name][0]
        g = torch.Generator(device="cpu").manual_seed(0)
        hidden, heads, k, d = case.hidden, case.num_mosa_heads, case.k, 64
        x = torch.randn(case.batch, case.seq_len, hidden, generator=g).cuda().bfloat16()
        w_qkv = (torch.randn(heads, hidden, 3 * d, generator=g) / hidden ** 0.5).cuda().bfloat16()
        w_o = (torch.randn(heads, d, hidden, generator=g) / d ** 0.5).cuda().bfloat16()
        w_r = (torch.randn(heads, hidden, generator=g) / hidden ** 0.5).cuda().bfloat16()
        grad_y = torch.randn_like(x)
        indices, scores = topk_route_reference(torch.einsum("eh,bth->bet", w_r.float(), x.float()), k, True)
        leaves = [t.detach().requires_grad_() for t in (x, w_qkv, w_o, w_r)]
        results = {}
        for deterministic in (False, True):
            def forward():
                return tm.fused_mosa_attention(leaves[0], leaves[1], leaves[2], indices, scores, d // 2, 1e4,
                                               leaves[3], deterministic=deterministic)

            def forward_backward():
                for leaf in leaves:
                    leaf.grad = None
                forward().backward(grad_y)

            def outputs():
                forward_backward()
                return [forward().detach()] + [leaf.grad.clone() for leaf in leaves]

            torch.use_deterministic_algorithms(deterministic)
            try:
                first = outputs()
                same = all(torch.equal(a, b) for a, b in zip(first, outputs()))
                torch.cuda.reset_peak_memory_stats()
                forward_backward()
                peak = torch.cuda.max_memory_allocated() / 2 ** 20
                fwd = triton.testing.do_bench(forward, return_mode="median")
                both = triton.testing.do_bench(forward_backward, return_mode="median")
            finally:
                torch.use_deterministic_algorithms(False)
            results[deterministic] = (first, fwd, both, peak, same)
            print(f"{name} {'slots + CSR sum' if deterministic else 'fp32 atomics'}: fwd {fwd:.3f} ms, "
                  f"fwd+bwd {both:.3f} ms, peak {peak:.0f} MiB, bitwise equal run to run: {same}", flush=True)
        difference = max(((a.double() - b.double()).norm() / b.double().norm()).item()
                         for a, b in zip(results[True][0], results[False][0]))
        for deterministic in (False, True):
            _, fwd, both, peak, same = results[deterministic]
            rows.append((name, "slots + CSR sum" if deterministic else "fp32 atomics", fwd, both, peak, same,
                         difference))
    print("\n| case | combine | fwd ms | fwd+bwd ms | peak MiB | bitwise equal run to run | rel. diff. between modes |")
    print("|---|---|---|---|---|---|---|")
    for name, mode, fwd, both, peak, same, difference in rows:
        print(f"| {name} | {mode} | {fwd:.3f} | {both:.3f} | {peak:.0f} | {same} | {difference:.1e} |")
    return 0 if all(row[5] for row in rows if row[1] != "fp32 atomics") else 1


if __name__ == "__main__":
    raise SystemExit(main())
