"""Dense, local, fixed-sparse and routing attention: equivalences, gradients, padding, errors."""

import math

import pytest
import torch

from torch_mosa import DenseAttention, FixedSparseAttention, LocalAttention, MoSAAttention, RoutingAttention
from torch_mosa.ops.rope import apply_rope

F64 = dict(dtype=torch.float64)


def naive_windowed_attention(layer: DenseAttention, x: torch.Tensor, window: float = math.inf) -> torch.Tensor:
    """Dense attention with an explicit T x T mask: key j visible to query t iff t - window < j <= t."""
    seq_len = x.shape[1]
    pos = torch.arange(seq_len)
    qkv = layer.w_qkv(x).view(x.shape[0], seq_len, layer.num_heads, 3 * layer.head_dim).transpose(1, 2)
    q, k, v = qkv.split(layer.head_dim, dim=-1)
    q, k = (apply_rope(t, pos, layer.rotary_dim, layer.rope_base) for t in (q, k))
    delta = pos[:, None] - pos[None, :]
    allowed = (delta >= 0) & (delta < window)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(layer.head_dim)
    att = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return layer.w_o(att.transpose(1, 2).reshape(x.shape[0], seq_len, -1))


def test_dense_matches_naive():
    layer = DenseAttention(16, 3, 8).double()
    x = torch.randn(2, 13, 16, **F64)
    torch.testing.assert_close(layer(x), naive_windowed_attention(layer, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seq_len,window", [(13, 4), (8, 8), (5, 9), (17, 1), (16, 3)])
def test_local_matches_masked_dense(seq_len, window):
    layer = LocalAttention(16, 2, 8, window=window).double()
    x = torch.randn(2, seq_len, 16, **F64)
    torch.testing.assert_close(layer(x), naive_windowed_attention(layer, x, window), rtol=1e-10, atol=1e-12)


def test_local_never_builds_a_full_matrix(monkeypatch):
    """Its attention calls see blocks of at most 2*window keys, never T keys."""
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(k.shape[-2]) or real_sdpa(q, k, v, **kw))
    LocalAttention(16, 2, 8, window=4).double()(torch.randn(1, 64, 16, **F64))
    assert seen and max(seen) <= 8


@pytest.mark.parametrize("cls", [DenseAttention, LocalAttention])
def test_right_padding_does_not_change_real_tokens(cls):
    layer = cls(16, 2, 8).double() if cls is DenseAttention else cls(16, 2, 8, window=3).double()
    x = torch.randn(1, 9, 16, **F64)
    padded = torch.cat([x, torch.randn(1, 4, 16, **F64)], dim=1)
    mask = torch.tensor([[1] * 9 + [0] * 4])
    torch.testing.assert_close(layer(padded, mask)[:, :9], layer(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [DenseAttention, LocalAttention])
def test_left_padding_is_ignored(cls):
    """Real tokens never attend to left padding; RoPE is relative, so only the shift remains and changes nothing."""
    layer = cls(16, 2, 8).double() if cls is DenseAttention else cls(16, 2, 8, window=3).double()
    x = torch.randn(1, 9, 16, **F64)
    padded = torch.cat([torch.randn(1, 4, 16, **F64), x], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 9])
    out = layer(padded, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 4:], layer(x), rtol=1e-10, atol=1e-12)


def test_fixed_heads_with_per_head_offsets_cover_every_token():
    """Head e strides from e mod sparsity: the heads together take every token, each head k of them, and a
    left-padded row strides from its first real token."""
    fixed = FixedSparseAttention(16, 5, 8, sparsity=3, per_head_offsets=True).double()
    x = torch.randn(1, 12, 16, **F64)
    indices, scores = fixed.select(x)
    assert indices[0].tolist() == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11], [0, 3, 6, 9], [1, 4, 7, 10]]
    assert (scores == 1).all()
    padded = torch.cat([torch.zeros(1, 2, 16, **F64), x], dim=1)
    indices, scores = fixed.select(padded, torch.tensor([[0, 0] + [1] * 12]))
    assert indices[0, 1, :4].tolist() == [3, 6, 9, 12] and (scores[0, :, :4] == 1).all()
    with pytest.raises(ValueError, match="per_head_offsets"):
        FixedSparseAttention(16, 2, 8, sparsity=3, per_head_offsets="yes")


def test_fixed_equals_mosa_with_forced_selection():
    fixed = FixedSparseAttention(16, 3, 8, sparsity=3).double()
    mosa = MoSAAttention(16, 3, 8, sparsity=3).double()
    mosa.w_qkv.data.copy_(fixed.w_qkv.data)
    mosa.w_o.data.copy_(fixed.w_o.data)
    x = torch.randn(2, 11, 16, **F64)
    indices = torch.arange(0, 9, 3).expand(2, 3, -1)  # k = 11 // 3 = 3 strided tokens (SPEC §1), not all 4
    torch.testing.assert_close(fixed(x), mosa.attend(x, indices, torch.ones(2, 3, 3, **F64)), rtol=1e-12, atol=0)
    assert not hasattr(fixed, "router")


def test_routing_clusters_and_centroid_update():
    layer = RoutingAttention(16, 2, 8, sparsity=4).double()
    x = torch.randn(2, 12, 16, **F64)
    before = layer.centroids.clone()
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(layer.centroids, before)
    layer.train()
    torch.testing.assert_close(layer(x), y_eval)  # the update happens after the output is computed
    assert not torch.equal(layer.centroids, before)
    torch.testing.assert_close(layer.centroids.norm(dim=-1), torch.ones(2, 4, **F64))


def test_routing_padding_never_selected():
    layer = RoutingAttention(16, 2, 8, sparsity=2).double().eval()
    x = torch.randn(1, 10, 16, **F64)
    mask = torch.tensor([[1] * 7 + [0] * 3])
    y = layer(x, mask)
    assert (y[0, 7:] == 0).all()


@pytest.mark.parametrize("build", [
    lambda: DenseAttention(6, 2, 4),
    lambda: LocalAttention(6, 2, 4, window=2),
    lambda: FixedSparseAttention(6, 2, 4, sparsity=2),
    lambda: RoutingAttention(6, 2, 4, sparsity=2),
], ids=["dense", "local", "fixed", "routing"])
def test_gradcheck(build):
    layer = build().double().eval()
    names = [n for n, _ in layer.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = torch.randn(2, 5, 6, **F64, requires_grad=True)

    def f(x, *weights):
        return torch.func.functional_call(layer, dict(zip(names, weights)), (x,))

    assert torch.autograd.gradcheck(f, (x, *weights))


@pytest.mark.parametrize("build,match", [
    (lambda: LocalAttention(16, 2, 8, window=0), "window"),
    (lambda: FixedSparseAttention(16, 2, 8, sparsity=0), "sparsity"),
    (lambda: RoutingAttention(16, 2, 8, sparsity=2, centroid_decay=1.0), "centroid_decay"),
    (lambda: DenseAttention(16, 0, 8), "num_heads"),
])
def test_bad_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("cls", [DenseAttention, RoutingAttention])
def test_bad_input_names_argument(cls):
    layer = cls(16, 2, 8)
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(1, 4, 12))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(1, 4, 16, **F64))
