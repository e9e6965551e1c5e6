"""The wide path's attention (ops/mosa/group_attention.py) in float64 on the CPU: its output against the softmax
written out, its written-out backward against autograd through its own forward over several chunks of heads, with
and without packed documents; on a GPU the flash route against the written-out one. (The wide path as a whole, RoPE
kernel included, is tested against the reference op in test_mosa_triton.py.)"""

import pytest
import torch

from torch_mosa.ops.mosa import group_attention as ga
from torch_mosa.ops.mosa.reference import document_mask, mosa_attention_composed, mosa_attention_reference
from torch_mosa.ops.selection.reference import topk_route_reference


def random_qkv(heads, batch, k, head_dim, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(heads, batch, k, head_dim, generator=g, dtype=torch.float64).to(device, dtype)
            for _ in range(3)]


def packed_mask(heads, batch, k):
    """Documents of each (head, row) group: slots 0-4 one document, the rest another (a third from slot 9 in row 1)."""
    documents = (torch.arange(k) >= 5).long().expand(heads, batch, k).clone()
    documents[:, 1] += (torch.arange(k) >= 9).long()
    return document_mask(documents)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed-documents"])
def test_forward_is_masked_softmax_attention(packed):
    q, k, v = random_qkv(3, 2, 13, 8, seed=1)
    allowed = packed_mask(3, 2, 13) if packed else None
    mask = allowed if packed else torch.ones(13, 13, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~mask, float("-inf"))
    expected = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(ga.group_attention(q, k, v, allowed).o, expected)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed-documents"])
def test_backward_matches_autograd(monkeypatch, packed):
    heads, batch, k = 5, 3, 13
    monkeypatch.setattr(ga, "BACKWARD_CHUNK_ELEMENTS", 2 * batch * k * k)  # three chunks of at most two heads
    allowed = packed_mask(heads, batch, k) if packed else None
    q, key, v = (t.requires_grad_() for t in random_qkv(heads, batch, k, 16, seed=2))
    do = random_qkv(heads, batch, k, 16, seed=3)[0]
    expected = torch.autograd.grad(ga.group_attention(q, key, v, allowed).o, (q, key, v), do)
    forward = ga.group_attention(q.detach(), key.detach(), v.detach(), allowed, for_backward=True)
    actual = ga.group_attention_backward(forward, do)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_composition_is_the_reference_in_float64():
    """The 16-bit composition (the wide path's yardstick in large_k_composition.py) is the reference's computation
    in its inputs' dtype: equal to it in float64."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 30, 12, generator=g, dtype=torch.float64)
    w_qkv = torch.randn(3, 12, 24, generator=g, dtype=torch.float64)
    w_o = torch.randn(3, 8, 12, generator=g, dtype=torch.float64)
    indices, scores = topk_route_reference(torch.randn(2, 3, 30, generator=g, dtype=torch.float64), 9, True)
    torch.testing.assert_close(mosa_attention_composed(x, w_qkv, w_o, indices, scores, 4, 1e4),
                               mosa_attention_reference(x, w_qkv, w_o, indices, scores, rotary_dim=4, rope_base=1e4))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_route_matches_the_written_out_backward(dtype):
    """On a GPU in 16 bits the backward calls the flash kernels SDPA dispatches to (their log-sum-exp kept from the
    forward); the written-out backward (the deterministic choice) on the same forward agrees within 16-bit
    rounding, and both match autograd through SDPA in float32."""
    heads, batch, k, head_dim = 7, 3, 300, 64
    q, key, v = random_qkv(heads, batch, k, head_dim, seed=7, dtype=torch.float32, device="cuda")
    do = random_qkv(heads, batch, k, head_dim, seed=8, dtype=torch.float32, device="cuda")[0]
    leaves = [t.clone().requires_grad_() for t in (q, key, v)]
    expected = torch.autograd.grad(ga.group_attention(*leaves).o, leaves, do)
    forward = ga.group_attention(q.to(dtype), key.to(dtype), v.to(dtype), for_backward=True)
    assert forward.flash is not None
    for deterministic in (False, True):
        for got, want in zip(ga.group_attention_backward(forward, do.to(dtype), deterministic), expected):
            error = ((got.float() - want).norm() / want.norm()).item()
            assert error < 1e-2, (deterministic, error)
