"""The wide path's attention (ops/mosa/group_attention.py): its written-out backward against autograd through its
own forward, in float64 on the CPU, over several chunks of heads, with and without packed documents; on a GPU the
flash route against the written-out one."""

import pytest
import torch

from torch_mosa.ops.mosa import group_attention as ga
from torch_mosa.ops.mosa.reference import mosa_attention_composed, mosa_attention_reference
from torch_mosa.ops.selection.reference import topk_route_reference


def selection(batch, heads, seq_len, k, seed):
    g = torch.Generator().manual_seed(seed)
    return topk_route_reference(torch.randn(batch, heads, seq_len, generator=g, dtype=torch.float64), k, True)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed-documents"])
@pytest.mark.parametrize("rotary_dim", [0, 6, 16])
def test_backward_matches_autograd(monkeypatch, packed, rotary_dim):
    batch, heads, seq_len, k, head_dim = 3, 5, 41, 13, 16
    monkeypatch.setattr(ga, "BACKWARD_CHUNK_ELEMENTS", 2 * batch * k * k)  # three chunks of at most two heads
    indices, _ = selection(batch, heads, seq_len, k, seed=rotary_dim)
    positions = document_ids = None
    if packed:
        document_ids = (torch.arange(seq_len) >= 17).long().expand(batch, -1).contiguous()
        document_ids[1] += (torch.arange(seq_len) >= 30).long()
        positions = torch.cat([torch.arange(17), torch.arange(seq_len - 17)]).expand(batch, -1).contiguous()
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(heads, batch * k, 3 * head_dim, generator=g, dtype=torch.float64, requires_grad=True)
    do = torch.randn(heads, batch * k, head_dim, generator=g, dtype=torch.float64)
    o = ga.group_attention(qkv, indices, rotary_dim, 1e4, positions, document_ids).o
    expected, = torch.autograd.grad(o, qkv, do)
    forward = ga.group_attention(qkv.detach(), indices, rotary_dim, 1e4, positions, document_ids, for_backward=True)
    actual = ga.group_attention_backward(forward, do, rotary_dim, 1e4)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_forward_is_the_reference_attention():
    """group_attention's O through W_O, scaled and summed into tokens, is the reference op (float64)."""
    batch, heads, seq_len, k, hidden, head_dim = 2, 3, 30, 9, 12, 8
    indices, scores = selection(batch, heads, seq_len, k, seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, seq_len, hidden, generator=g, dtype=torch.float64)
    w_qkv = torch.randn(heads, hidden, 3 * head_dim, generator=g, dtype=torch.float64)
    w_o = torch.randn(heads, head_dim, hidden, generator=g, dtype=torch.float64)
    rows = x.gather(1, indices.reshape(batch, heads * k, 1).expand(-1, -1, hidden)).view(batch, heads, k, hidden)
    qkv = torch.einsum("bekh,ehd->ebkd", rows, w_qkv).reshape(heads, batch * k, 3 * head_dim)
    o = ga.group_attention(qkv, indices, 4, 1e4).o.view(heads, batch, k, head_dim)
    head_out = torch.einsum("ebkd,edh->bekh", o * scores.transpose(0, 1).unsqueeze(-1), w_o)
    y = torch.zeros_like(x).scatter_add_(1, indices.reshape(batch, heads * k, 1).expand(-1, -1, hidden),
                                         head_out.reshape(batch, heads * k, hidden))
    expected = mosa_attention_reference(x, w_qkv, w_o, indices, scores, rotary_dim=4, rope_base=1e4)
    torch.testing.assert_close(y, expected)
    # the 16-bit composition (the wide path's yardstick) is the reference's computation in its inputs' dtype
    torch.testing.assert_close(mosa_attention_composed(x, w_qkv, w_o, indices, scores, 4, 1e4), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_route_matches_the_written_out_backward(dtype):
    """On a GPU in 16 bits the backward calls the flash kernels SDPA dispatches to (their log-sum-exp kept from the
    forward); the written-out backward (the deterministic choice) on the same forward agrees within 16-bit
    rounding, and both match autograd through SDPA in float32."""
    batch, heads, seq_len, k, head_dim = 3, 7, 700, 300, 64
    indices, _ = selection(batch, heads, seq_len, k, seed=7)
    indices = indices.cuda()
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(heads, batch * k, 3 * head_dim, generator=g).cuda()
    do = torch.randn(heads, batch * k, head_dim, generator=g).cuda()
    wide = qkv.clone().requires_grad_()
    expected, = torch.autograd.grad(ga.group_attention(wide, indices, 32, 1e4).o, wide, do)
    forward = ga.group_attention(qkv.to(dtype), indices, 32, 1e4, for_backward=True)
    assert forward.flash is not None
    flash = ga.group_attention_backward(forward, do.to(dtype), 32, 1e4)
    written_out = ga.group_attention_backward(forward, do.to(dtype), 32, 1e4, deterministic=True)
    for name, got in (("flash", flash), ("written out", written_out)):
        error = ((got.float() - expected).norm() / expected.norm()).item()
        assert error < 1e-2, (name, error)
