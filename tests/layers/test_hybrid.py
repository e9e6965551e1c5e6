import pytest
import torch

from torch_mosa import HybridAttention
from torch_mosa.flops import isoflop_num_heads

F64 = dict(dtype=torch.float64)


def test_sum_of_parts():
    layer = HybridAttention(16, 8, num_mosa_heads=3, num_dense_heads=2, num_local_heads=1, window=3, sparsity=2,
                            include_first=True).double()
    x = torch.randn(2, 9, 16, **F64)
    expected = layer.dense(x) + layer.local(x) + layer.sparse(x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_isoflop_head_count():
    layer = HybridAttention(512, 64, num_heads=9, seq_len=1024, sparsity=64, include_first=True)
    assert layer.sparse.num_heads == 505 == isoflop_num_heads(512, 64, 9, 1024, 64)
    assert layer.dense.num_heads == 4 and layer.local is None


@pytest.mark.parametrize("kind", ["fixed", "routing"])
def test_baseline_kinds(kind):
    layer = HybridAttention(16, 8, num_mosa_heads=2, sparsity=2, sparse_kind=kind).double()
    assert layer(torch.randn(1, 6, 16, **F64)).shape == (1, 6, 16)


def test_single_token_with_include_first():
    """At T=1 token 0 is the only token, selected either way."""
    layer = HybridAttention(16, 8, num_mosa_heads=2, num_dense_heads=1, sparsity=4, include_first=True).double()
    x = torch.randn(2, 1, 16, **F64)
    no_first = HybridAttention(16, 8, num_mosa_heads=2, num_dense_heads=1, sparsity=4).double()
    no_first.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), no_first(x))


def test_gradcheck():
    layer = HybridAttention(6, 4, num_mosa_heads=2, num_dense_heads=1, num_local_heads=1, window=2, sparsity=2,
                            include_first=True).double()
    names = [n for n, _ in layer.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = torch.randn(1, 5, 6, **F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, *w: torch.func.functional_call(layer, dict(zip(names, w)), (x,)), (x, *weights))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_mosa_heads=None, sparsity=4), "num_heads"),
    (dict(num_mosa_heads=0, num_dense_heads=0), "at least one head"),
    (dict(num_mosa_heads=2, sparsity=4, num_local_heads=1), "window"),
    (dict(num_mosa_heads=2, sparsity=4, sparse_kind="topk"), "sparse_kind"),
    (dict(num_mosa_heads=-1, sparsity=4), "num_mosa_heads"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridAttention(16, 8, **kwargs)


def test_seq_len_zero_is_a_clear_error():
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1, got seq_len=0"):
        HybridAttention(64, head_dim=16, num_heads=4, seq_len=0, sparsity=4)
