"""MoSAAttention properties beyond the naive oracle (test_mosa_oracle.py): sorting, RoPE, padding, gradients, errors."""

import pytest
import torch

from torch_mosa import MoSAAttention
from torch_mosa.ops.selection import topk_route
from torch_mosa.ops.mosa.reference import mosa_attention_reference


def make(hidden=16, heads=3, head_dim=8, **kw):
    if "k" not in kw:
        kw.setdefault("sparsity", 3)
    layer = MoSAAttention(hidden, heads, head_dim, **kw).double()
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    return layer


def test_sorting_invariance():
    """The op over a sorted selection with a slot-causal mask equals any order with the position-aware mask."""
    layer = make()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    indices, scores = layer.select(x)
    y_sorted = mosa_attention_reference(x, layer.w_qkv, layer.w_o, indices, scores, layer.rotary_dim, layer.rope_base)
    perm = torch.randperm(indices.shape[-1])
    shuffled_idx, shuffled_scores = indices[..., perm], scores[..., perm]
    # explicit position mask on the shuffled order
    xs = x.gather(1, shuffled_idx.reshape(2, -1, 1).expand(-1, -1, 16)).view(2, 3, -1, 16)
    q, k, v = torch.einsum("bekh,ehd->bekd", xs, layer.w_qkv).split(8, dim=-1)
    from torch_mosa.ops.rope import apply_rope
    q, k = (apply_rope(t, shuffled_idx, layer.rotary_dim, layer.rope_base) for t in (q, k))
    mask = shuffled_idx.unsqueeze(-1) >= shuffled_idx.unsqueeze(-2)
    att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = torch.einsum("bekd,edh->bekh", att * shuffled_scores.unsqueeze(-1), layer.w_o)
    y_shuffled = torch.zeros_like(x).scatter_add_(1, shuffled_idx.reshape(2, -1, 1).expand(-1, -1, 16),
                                                  out.reshape(2, -1, 16))
    torch.testing.assert_close(y_sorted, y_shuffled, rtol=1e-12, atol=1e-12)


def test_selection_is_sorted_and_topk():
    logits = torch.randn(2, 4, 13, dtype=torch.float64)
    indices, scores = topk_route(logits, 4, include_first=False)
    assert (indices.diff(dim=-1) > 0).all()
    expected = logits.topk(4, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(indices, expected)
    torch.testing.assert_close(scores, torch.sigmoid(logits.gather(-1, indices)))


def test_include_first_always_selects_token_zero():
    logits = torch.randn(3, 5, 9)
    logits[..., 0] = -100.0
    indices, _ = topk_route(logits, 2, include_first=True)
    assert (indices[..., 0] == 0).all()


def test_left_padding_shift_invariance():
    """A masked pad token in front shifts every original position by one; RoPE is relative, so the outputs of the
    real tokens must not change. (That RoPE uses original positions, not slot ranks, is in test_mosa_oracle.py.)"""
    layer = make(rotate_fraction=1.0, k=3)
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    shifted = torch.cat([torch.randn(1, 1, 16, dtype=torch.float64), x], dim=1)
    y_shifted = layer(shifted, attention_mask=torch.tensor([[0] + [1] * 8]))
    torch.testing.assert_close(y_shifted[:, 1:], layer(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_selected(side):
    layer = make(k=4)
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    if side == "left":
        mask[0, :3] = False
    else:
        mask[0, 6:] = False
    indices, scores = layer.select(x, mask)
    picked_real = mask[0][indices[0]]
    assert picked_real.all()
    y = layer(x, mask)
    assert (y[0][~mask[0]] == 0).all()
    # the padded row equals running the layer on the real tokens alone (positions shifted for left padding)
    real = x[0:1, mask[0]]
    if side == "right":
        torch.testing.assert_close(y[0:1, mask[0]], layer(real), rtol=1e-10, atol=1e-12)


def test_fewer_real_tokens_than_k():
    """Slots beyond the real tokens get score 0 and go last: nothing is attended or written at padding."""
    layer = make(k=5)
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    y = layer(x, mask)
    assert (y[0, :5] == 0).all()
    shifted = make(k=3)
    shifted.load_state_dict(layer.state_dict())
    torch.testing.assert_close(y[:, 5:], shifted(x[:, 5:]), rtol=1e-10, atol=1e-12)


def test_gradcheck():
    layer = make(hidden=6, heads=2, head_dim=4, sparsity=2, include_first=True)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    params = [layer.router.weight, layer.w_qkv, layer.w_o]

    def f(x, *weights):
        for p, w in zip(params, weights):
            p.data = w.detach()
        return torch.func.functional_call(layer, dict(zip(["router.weight", "w_qkv", "w_o"], weights)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in params]))


def test_router_receives_gradient():
    layer = make()
    layer(torch.randn(2, 9, 16, dtype=torch.float64)).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_short_input_selects_two():
    layer = make(sparsity=64)
    assert layer.selection_size(10) == 2 and layer.selection_size(1) == 1


@pytest.mark.parametrize("make_input,exc,match", [
    (lambda: torch.randn(10, 16, dtype=torch.float64), ValueError, "rank"),
    (lambda: torch.randn(1, 10, 15, dtype=torch.float64), ValueError, "hidden_size"),
    (lambda: torch.randn(1, 10, 16, dtype=torch.float32), TypeError, "dtype"),
    (lambda: torch.randn(1, 10, 16, dtype=torch.float64, device="meta"), ValueError, "meta"),
    (lambda: torch.randint(0, 3, (1, 10, 16)), TypeError, "floating"),
    (lambda: [[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_input(make_input, exc, match):
    with pytest.raises(exc, match=match):
        make()(make_input())


def test_bad_mask():
    with pytest.raises(ValueError, match="attention_mask"):
        make()(torch.randn(2, 10, 16, dtype=torch.float64), torch.ones(2, 9, dtype=torch.bool))


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=0), "sparsity"), (dict(sparsity=None), "exactly one"), (dict(sparsity=2, k=3), "exactly one"),
    (dict(sparsity=None, k=0), "k"), (dict(sparsity=None, k=1, include_first=True), "k"),
    (dict(rotate_fraction=1.5), "rotate_fraction"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_k_larger_than_seq_len():
    with pytest.raises(ValueError, match="k=6.*seq_len=5"):
        make(sparsity=None, k=6)(torch.randn(1, 5, 16, dtype=torch.float64))


def test_single_token_with_include_first():
    """At T=1 the only token is picked with or without include_first: one rule (top-k's), no special case."""
    layer = make(include_first=True)
    plain = make()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 1, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)
