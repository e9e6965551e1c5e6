"""Why `test_fused_decode_in_bfloat16_on_the_gpu[32-505-1024-None]` fails on some runs (session 8: relative error
0.012, then 0.026, then a pass, on three H200 hosts, with fixed inputs).

Rebuilds the test's inputs, then repeats, in one process:
- the all-heads Q|K|V (`_all_heads_qkv`: `torch.bmm(..., out_dtype=float32)`): is it bitwise the same call to call,
  and how far from an fp32 GEMM of the same bf16 values?
- the whole fused step (`sparse_decode_triton`, grouped by head) on fresh copies of the cache: its relative error
  against the float64 reference each time, with the projection as is and with it replaced by the fp32 GEMM.
Varying errors with a fixed projection point at the kernels; varying projections point at cuBLAS.

On the GPU machine: `PYTHONPATH=src python benchmarks/experiments/grouped_decode_flake.py`.
"""

import torch

from torch_mosa.ops.decode import triton_decode
from torch_mosa.ops.decode.reference import sparse_decode_reference

REPEATS = 4


def inputs(batch=32, num_heads=505, capacity=1024, hidden=512, head_dim=64):
    """The failing test's inputs (tests/ops/test_sparse_decode.py), on the GPU in bf16."""
    g = torch.Generator().manual_seed(batch + num_heads)
    x = torch.randn(batch, hidden, generator=g)
    w_qkv = torch.randn(num_heads, hidden, 3 * head_dim, generator=g) / hidden ** 0.5
    w_o = torch.randn(num_heads, head_dim, hidden, generator=g) / head_dim ** 0.5
    cache = torch.randn(2, batch, num_heads, capacity + 1, head_dim, generator=g)
    counts = torch.randint(0, capacity + 1, (batch, num_heads), generator=g)
    joined = torch.rand(batch, num_heads, generator=g) < 0.5
    scores = torch.rand(joined.shape, generator=g)
    bf16 = [t.cuda().bfloat16() for t in (x, w_qkv, w_o, cache[0], cache[1])]
    return bf16, counts.cuda(), joined.cuda(), scores.cuda(), torch.tensor([capacity + 7], device="cuda")


def step(op, tensors, counts, joined, scores, position, dtype):
    x, w_qkv, w_o, k, v = [t.clone().to(dtype) for t in tensors]
    overflow = torch.zeros((), dtype=torch.long, device="cuda")
    return op(x, None, joined, scores.to(dtype), position, w_qkv, w_o, k, v, counts.clone(), overflow, 32, 10000.0)


def main() -> None:
    tensors, counts, joined, scores, position = inputs()
    x, w_qkv = tensors[0], tensors[1]
    projections = [triton_decode._all_heads_qkv(x, w_qkv) for _ in range(REPEATS)]
    exact = torch.matmul(x.float(), w_qkv.float())
    for i, p in enumerate(projections):
        print(f"projection {i}: bitwise equal to the first: {torch.equal(p, projections[0])}; max |diff| from the "
              f"fp32 GEMM {(p - exact).abs().max().item():.3e} (relative {((p - exact).norm() / exact.norm()).item():.3e})")
    reference = step(sparse_decode_reference, tensors, counts, joined, scores, position, torch.float64)
    original = triton_decode._all_heads_qkv
    for name, projection in (("bmm out_dtype=float32", original),
                             ("fp32 GEMM", lambda x, w: torch.matmul(x.float(), w.float()))):
        triton_decode._all_heads_qkv = projection
        for i in range(REPEATS):
            out = step(triton_decode.sparse_decode_triton, tensors, counts, joined, scores, position, torch.bfloat16)
            error = ((out.double() - reference).norm() / reference.norm()).item()
            print(f"{name}, step {i}: relative RMS error {error:.4f} (test bound 0.01)", flush=True)
    triton_decode._all_heads_qkv = original


if __name__ == "__main__":
    main()
