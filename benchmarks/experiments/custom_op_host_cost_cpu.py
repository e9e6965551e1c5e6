"""Host cost of the MoSA op's Python wrapping, on a CPU: the torch.library custom ops against a plain
torch.autograd.Function and against bare calls of the forward and backward functions.

Every Triton launch is stubbed out (JITFunction.run does nothing) and the shapes are tiny, so the time left is the
host's own: dispatch, autograd bookkeeping, buffer allocation. It compares the wrappers, not the GPU machine's host,
which is faster (benchmarks/results/profile-layer-host-h100-2026-11-23.txt has that one).

Run: `PYTHONPATH=src python benchmarks/experiments/custom_op_host_cost_cpu.py`.
"""

import time

import torch
import triton

from torch_mosa.ops.mosa import triton_mosa as tm

REPEATS = 300


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_qkv, w_o, w_router, indices, scores):
        y, o = tm.mosa_fwd(x, w_qkv, w_o, indices, scores, 8, 1e4)
        ctx.save_for_backward(x, w_qkv, w_o, w_router, indices, scores, o)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_qkv, w_o, w_router, indices, scores, o = ctx.saved_tensors
        dx, dw_qkv, dw_o, dw_router = tm.mosa_bwd(dy.contiguous(), x, w_qkv, w_o, w_router, indices, scores, o, 8, 1e4)
        return dx, dw_qkv, dw_o, dw_router, None, None


def main() -> None:
    triton.runtime.jit.JITFunction.run = lambda self, *args, grid=None, warmup=False, **kwargs: None
    batch, seq_len, hidden, heads, k, head_dim = 1, 32, 32, 3, 4, 16
    torch.manual_seed(0)
    leaves = [torch.randn(batch, seq_len, hidden), torch.randn(heads, hidden, 3 * head_dim),
              torch.randn(heads, head_dim, hidden), torch.randn(heads, hidden)]
    x, w_qkv, w_o, w_router = [t.requires_grad_() for t in leaves]
    indices = torch.sort(torch.randperm(seq_len)[:k].repeat(batch, heads, 1), -1).values
    scores = torch.sigmoid(torch.randn(batch, heads, k))

    def custom_ops():
        tm._mosa_fwd_op(x, w_qkv, w_o, w_router, indices, scores, 8, 1e4, None, None, False,
                        tm._split_path(k))[0].sum().backward()

    def library_eager():
        tm.fused_mosa_attention(x, w_qkv, w_o, indices, scores, 8, 1e4, w_router).sum().backward()

    def autograd_function():
        _Function.apply(x, w_qkv, w_o, w_router, indices, scores).sum().backward()

    def bare_calls():
        y, o = tm.mosa_fwd(x.detach(), w_qkv.detach(), w_o.detach(), indices, scores, 8, 1e4)
        tm.mosa_bwd(torch.ones_like(y), x.detach(), w_qkv.detach(), w_o.detach(), w_router.detach(), indices,
                    scores, o, 8, 1e4)

    print("| wrapping | host us per forward + backward (Triton launches stubbed) |\n|---|---|")
    for name, step in (("torch.library custom ops (what torch.compile traces)", custom_ops),
                       ("fused_mosa_attention in eager mode (its autograd.Function, since session 7)", library_eager),
                       ("torch.autograd.Function", autograd_function), ("bare mosa_fwd + mosa_bwd", bare_calls)):
        for _ in range(20):
            step()
        start = time.perf_counter()
        for _ in range(REPEATS):
            step()
        print(f"| {name} | {(time.perf_counter() - start) / REPEATS * 1e6:.0f} |")


if __name__ == "__main__":
    main()
