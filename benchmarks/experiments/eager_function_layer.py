"""Does the eager autograd.Function (session 7) make the layer faster than the custom ops' dispatch it replaced?

In eager mode `fused_mosa_attention` now calls the kernels through a plain torch.autograd.Function and keeps the
torch.library custom ops for torch.compile (custom_op_host_cost_cpu.py: 278 -> 184 us of host time per forward +
backward on the CPU harness). Case C is bound by the host (KERNEL_NOTES.md, session 5), so the saving should show
there. This times the SPEC §6 case A and C layers (forward + backward, do_bench median) both ways, alternately in one
process (the old way by making `torch.compiler.is_compiling` answer True in eager mode, which routes the call
through the custom ops), beside the dense layer, with the host's time to issue one step.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/eager_function_layer.py`.
"""

import torch

from torch_mosa.bench.cases import CASES, _layers, case_inputs, host_ms_per_step, time_layer


def main() -> None:
    is_compiling = torch.compiler.is_compiling
    rows = []
    for name in ("C", "A"):
        case = CASES[name][0]
        mosa, dense = _layers(case, "cuda")
        x, grad_y = case_inputs(case, "cuda")
        dense_ms, _ = time_layer(dense, x, grad_y)
        for repeat in range(2):
            for label, wrapper in (("autograd.Function", is_compiling), ("custom ops", lambda: True)):
                torch.compiler.is_compiling = wrapper
                try:
                    ms, _ = time_layer(mosa, x, grad_y)
                    issued = host_ms_per_step(mosa, x, grad_y)
                finally:
                    torch.compiler.is_compiling = is_compiling
                rows.append((name, label, repeat, ms, ms / dense_ms, issued))
                print(f"{name} {label} #{repeat}: {ms:.3f} ms ({ms / dense_ms:.2f}x dense {dense_ms:.3f}), host "
                      f"{issued:.3f} ms per step", flush=True)
    print("\n| case | eager op wrapper | repeat | fwd+bwd ms | vs dense | host ms to issue a step |")
    print("|---|---|---|---|---|---|")
    for name, label, repeat, ms, ratio, issued in rows:
        print(f"| {name} | {label} | {repeat} | {ms:.3f} | {ratio:.2f}x | {issued:.3f} |")


if __name__ == "__main__":
    main()
