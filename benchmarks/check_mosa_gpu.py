"""GPU correctness of the fused MoSA op: relative error vs a float64 reference, output and all four gradients.

Run on a CUDA machine: `PYTHONPATH=src python benchmarks/check_mosa_gpu.py [--log FILE]`. Fresh random inputs per
case; every freshly allocated float buffer is filled with NaN first, so unwritten memory shows as NaN (and fails).
Thresholds: bfloat16 2e-2; float32 the larger of 1e-5 and twice the float32 reference's own error (dots run as
three-pass tf32, ~fp32 accuracy; at positions in the thousands the fp32 RoPE angles themselves, which the contract
fixes, cost ~1e-5, and the ref32 column shows the reference paying the same). Exit code 1 on any failure.
"""

import argparse
import sys

import torch

from torch_mosa.layers.mosa import topk_selection
from torch_mosa.ops.mosa.reference import mosa_attention_reference
from torch_mosa.ops.mosa.triton_mosa import MAX_FUSED_K, MAX_FUSED_K_FP32, mosa_attention_triton

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
NAMES = ("y", "dx", "dw_qkv", "dw_o", "dscores")
# batch, seq_len, hidden, heads, k, include_first, padded
CASES = [
    (1, 333, 256, 1, 2, True, False),
    (3, 101, 128, 7, 2, False, True),
    (2, 1000, 512, 600, 16, True, False),
    (4, 130, 384, 100, 16, False, True),
    (1, 1023, 512, 505, 16, True, False),
    (3, 517, 512, 37, 64, False, True),
    (1, 8191, 1024, 60, 64, False, False),
    (2, 4097, 256, 13, 128, True, False),
    (2, 1100, 256, 8, 256, True, True),
]


def poison_allocations():
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **kw: poison(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(empty_like(*a, **kw))


def run(op, inputs, indices, scores, grad_y, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (*inputs, scores)]
    x, w_qkv, w_o, s = leaves
    y = op(x, w_qkv, w_o, indices, s, 32, 10000.0)
    y.backward(grad_y.to(dtype))
    return [y.detach()] + [t.grad for t in leaves]


def fast(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base):
    return mosa_attention_triton(x, w_qkv, w_o, indices, scores, rotary_dim=rotary_dim, rope_base=rope_base)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    poison_allocations()
    device, head_dim = torch.device("cuda"), 64
    rows, failed = [], False
    for seed, (batch, seq_len, hidden, heads, k, include_first, padded) in enumerate(CASES):
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(batch, seq_len, hidden, device=device, generator=g)
        w_qkv = torch.randn(heads, hidden, 3 * head_dim, device=device, generator=g) / hidden ** 0.5
        w_o = torch.randn(heads, head_dim, hidden, device=device, generator=g) / head_dim ** 0.5
        logits = torch.randn(batch, seq_len, heads, device=device, generator=g)
        mask = None
        if padded:
            mask = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
            mask[0, : seq_len - k + 1] = False
        indices, scores = topk_selection(logits, k, include_first, mask)
        grad_y = torch.randn(batch, seq_len, hidden, device=device, generator=g)
        expected = run(mosa_attention_reference, (x, w_qkv, w_o), indices, scores, grad_y, torch.float64)
        reference32 = run(mosa_attention_reference, (x, w_qkv, w_o), indices, scores, grad_y, torch.float32)
        ref_errors = [((a.double() - e).norm() / e.norm()).item() for a, e in zip(reference32, expected)]
        for dtype in (torch.float32, torch.bfloat16):
            actual = run(fast, (x, w_qkv, w_o), indices, scores, grad_y, dtype)
            errors = [((a.double() - e).norm() / e.norm()).item() for a, e in zip(actual, expected)]
            limits = [max(TOLERANCE[dtype], 2 * r) if dtype == torch.float32 else TOLERANCE[dtype] for r in ref_errors]
            ok = all(err <= limit for err, limit in zip(errors, limits))  # NaN compares False
            failed |= not ok
            path = "fused" if k <= (MAX_FUSED_K_FP32 if dtype == torch.float32 else MAX_FUSED_K) else "reference"
            rows.append(f"| {batch} | {seq_len} | {hidden} | {heads} | {k} | {include_first} | {padded} | {path} | "
                        f"{str(dtype)[6:]} | " + " | ".join(f"{e:.1e}" for e in errors)
                        + f" | {max(ref_errors):.1e} | {'ok' if ok else 'FAIL'} |")
            print(rows[-1], flush=True)
    table = ["| B | T | h | heads | k | include_first | padded | path | dtype | " + " | ".join(NAMES) + " | ref32 | |",
             "|" + "---|" * 16] + rows
    text = "\n".join(table)
    print("\n" + text)
    if args.log:
        with open(args.log, "w") as f:
            f.write(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
