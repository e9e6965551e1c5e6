"""Independent float64 oracle for ``MoSAAttention`` (SPEC §1), written from the SPEC alone.

The oracle is deliberately naive: Python loops over batch, heads, selected tokens and query/key pairs, a
selection kept in a random order (never sorted), and the mask decided pair by pair from original positions.
It shares no code with the layer; it only reads the layer's parameters (router.weight, w_qkv, w_o).
"""

import itertools
import math
import random

import pytest
import torch

RTOL, ATOL = 1e-10, 1e-12
HIDDEN = 16


def _rotary_dim(head_dim, rotate_fraction):
    rotary_dim = int(rotate_fraction * head_dim)
    return rotary_dim - rotary_dim % 2


def _num_selected(T, sparsity, k):
    """SPEC §1 step 2: k = max(2, floor(T / sparsity)), at most T; or the fixed k."""
    if k is not None:
        return k
    return min(T, max(2, math.floor(T / sparsity)))


def _rope(u, position, rotary_dim, rope_base):
    """GPT-NeoX "rotate_half" RoPE on the first ``rotary_dim`` entries of one vector ``u`` [head_dim]."""
    if rotary_dim == 0:
        return u
    half = rotary_dim // 2
    rotated, rest = u[:rotary_dim], u[rotary_dim:]
    inv_freq = [rope_base ** (-(2 * i) / rotary_dim) for i in range(half)]
    angles = torch.tensor([position * inv_freq[j % half] for j in range(rotary_dim)], dtype=u.dtype)
    rotate_half = torch.cat([-rotated[half:], rotated[:half]])
    return torch.cat([rotated * torch.cos(angles) + rotate_half * torch.sin(angles), rest])


def mosa_oracle(x, router_weight, w_qkv, w_o, *, sparsity=None, k=None, include_first=False,
                rotate_fraction=0.5, rope_base=10000.0, attention_mask=None, order_seed=0,
                rank_positions=False):
    """Naive MoSA layer, SPEC §1 steps 1-7, summed over heads.

    x [B, T, h], router_weight [E, h], w_qkv [E, h, 3h'] (Q|K|V), w_o [E, h', h] -> y [B, T, h].
    attention_mask [B, T] (1 = real token): padded positions are never candidates for selection.
    order_seed: the selection is shuffled with this seed, to show that its order does not matter.
    rank_positions: WRONG variant for the RoPE test, rotating by rank in the sorted selection instead of
    by original position.
    Differentiable in x and in all three weights (the selection itself is a discrete choice).
    """
    B, T, hidden = x.shape
    E, head_dim = w_o.shape[0], w_o.shape[1]
    rotary_dim = _rotary_dim(head_dim, rotate_fraction)
    num_selected = _num_selected(T, sparsity, k)
    shuffler = random.Random(order_seed)
    batch_outputs = []
    for b in range(B):
        rows = [torch.zeros(hidden, dtype=x.dtype) for _ in range(T)]
        real = [t for t in range(T) if attention_mask is None or bool(attention_mask[b, t])]
        for e in range(E):
            # Step 1: r = sigmoid(X w_r), one token at a time.
            r = [torch.sigmoid(torch.dot(x[b, t], router_weight[e])) for t in range(T)]
            # Step 2: top-k by score among real tokens; include_first forces token 0 and picks k-1 others.
            if include_first:
                others = sorted((t for t in real if t != 0), key=lambda t: -r[t].item())
                selection = [0] + others[: num_selected - 1]
            else:
                selection = sorted(real, key=lambda t: -r[t].item())[:num_selected]
            assert len(selection) == num_selected, "oracle case needs at least k real tokens"
            shuffler.shuffle(selection)
            ranks = sorted(selection)
            w_q = w_qkv[e][:, :head_dim]
            w_k = w_qkv[e][:, head_dim: 2 * head_dim]
            w_v = w_qkv[e][:, 2 * head_dim:]
            # Steps 3-4: project only the selected rows; RoPE at the original position.
            q, key, v = [], [], []
            for t in selection:
                position = ranks.index(t) if rank_positions else t
                q.append(_rope(x[b, t] @ w_q, position, rotary_dim, rope_base))
                key.append(_rope(x[b, t] @ w_k, position, rotary_dim, rope_base))
                v.append(x[b, t] @ w_v)
            # Step 5: query i sees key j iff I[i] >= I[j]; softmax over the visible keys only.
            for i, t_query in enumerate(selection):
                visible = [j for j, t_key in enumerate(selection) if t_query >= t_key]
                logits = torch.stack([torch.dot(q[i], key[j]) / math.sqrt(head_dim) for j in visible])
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                attended = sum(weights[n] * v[j] for n, j in enumerate(visible))
                # Steps 6-7: scale by the token's own score, add to its original position.
                rows[t_query] = rows[t_query] + r[t_query] * (attended @ w_o[e])
        batch_outputs.append(torch.stack(rows))
    return torch.stack(batch_outputs)


# ---------------------------------------------------------------------------------------------- helpers

def _make_layer(num_heads, head_dim, seed, **kwargs):
    from torch_mosa import MoSAAttention

    layer = MoSAAttention(HIDDEN, num_heads, head_dim=head_dim, **kwargs).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.router.weight.copy_(0.5 * torch.randn(layer.router.weight.shape, generator=generator,
                                                    dtype=torch.float64))
        layer.w_qkv.copy_(0.3 * torch.randn(layer.w_qkv.shape, generator=generator, dtype=torch.float64))
        layer.w_o.copy_(0.3 * torch.randn(layer.w_o.shape, generator=generator, dtype=torch.float64))
    return layer


def _weights(layer):
    return layer.router.weight, layer.w_qkv, layer.w_o


def _oracle_for(layer, x, layer_kwargs, **kwargs):
    return mosa_oracle(x, *_weights(layer), **layer_kwargs, **kwargs)


def _x(B, T, seed):
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(10_000 + seed),
                       dtype=torch.float64)


def _assert_matches(actual, expected, case):
    max_error = (actual - expected).abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{case}: max abs error {max_error:.3e}\n{m}")


# --------------------------------------------------------------------------------------- forward cases

# (T, sparsity or fixed k, include_first) crossed; the remaining axes (num_heads, head_dim,
# rotate_fraction, B) cycle through all 16 of their combinations across the 50 crossed cases.
_OTHER_AXES = list(itertools.product([1, 3], [8, 6], [0.5, 1.0], [1, 2]))
_SELECTIONS = [("sparsity", 2), ("sparsity", 3), ("sparsity", 4), ("k", 2), ("k", "T")]
FORWARD_CASES = []
for _index, (_T, (_kind, _value), _first) in enumerate(
        itertools.product([2, 3, 7, 13, 33], _SELECTIONS, [False, True])):
    _heads, _head_dim, _fraction, _B = _OTHER_AXES[(_index * 5) % 16]
    _value = _T if _value == "T" else _value
    FORWARD_CASES.append(pytest.param(
        _index, _T, {_kind: _value, "include_first": _first, "rotate_fraction": _fraction}, _heads,
        _head_dim, _B,
        id=f"T{_T}-{_kind}{_value}-first{int(_first)}-E{_heads}-d{_head_dim}-rot{_fraction}-B{_B}"))


def test_forward_cases_cover_every_other_axis_combination():
    used = {(p.values[3], p.values[4], p.values[2]["rotate_fraction"], p.values[5]) for p in FORWARD_CASES}
    assert used == set(_OTHER_AXES)


@pytest.mark.parametrize("seed, T, layer_kwargs, num_heads, head_dim, B", FORWARD_CASES)
def test_forward_matches_oracle(seed, T, layer_kwargs, num_heads, head_dim, B, request):
    layer = _make_layer(num_heads, head_dim, seed, **layer_kwargs)
    x = _x(B, T, seed)
    with torch.no_grad():
        y = layer(x)
        expected = _oracle_for(layer, x, layer_kwargs, order_seed=seed)
    assert y.shape == (B, T, HIDDEN) and y.dtype == torch.float64
    _assert_matches(y, expected, request.node.callspec.id)


# -------------------------------------------------------------------------------------------- gradients

GRADIENT_CASES = [
    pytest.param(101, 13, {"sparsity": 3, "include_first": False, "rotate_fraction": 0.5}, 3, 8, 2,
                 id="T13-sparsity3-first0-E3-d8-rot0.5-B2"),
    pytest.param(102, 13, {"sparsity": 4, "include_first": True, "rotate_fraction": 1.0}, 3, 6, 2,
                 id="T13-sparsity4-first1-E3-d6-rot1.0-B2"),
    pytest.param(103, 7, {"k": 7, "include_first": True, "rotate_fraction": 0.5}, 1, 6, 1,
                 id="T7-k7-first1-E1-d6-rot0.5-B1"),
    pytest.param(104, 33, {"k": 5, "include_first": False, "rotate_fraction": 1.0}, 3, 8, 1,
                 id="T33-k5-first0-E3-d8-rot1.0-B1"),
]


@pytest.mark.parametrize("seed, T, layer_kwargs, num_heads, head_dim, B", GRADIENT_CASES)
def test_gradients_match_oracle(seed, T, layer_kwargs, num_heads, head_dim, B, request):
    layer = _make_layer(num_heads, head_dim, seed, **layer_kwargs)
    x = _x(B, T, seed).requires_grad_(True)
    g = torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(20_000 + seed), dtype=torch.float64)
    names = ["x", "router.weight", "w_qkv", "w_o"]

    layer_grads = torch.autograd.grad((layer(x) * g).sum(), [x, *_weights(layer)])
    oracle_inputs = [x.detach().clone().requires_grad_(True)] + [
        w.detach().clone().requires_grad_(True) for w in _weights(layer)]
    expected = mosa_oracle(*oracle_inputs, **layer_kwargs, order_seed=seed)
    oracle_grads = torch.autograd.grad((expected * g).sum(), oracle_inputs)

    for name, actual, wanted in zip(names, layer_grads, oracle_grads):
        _assert_matches(actual, wanted, f"{request.node.callspec.id} grad {name}")


# ---------------------------------------------------------------------------------------------- padding

def _right_and_left_padded_mask(B, T, real_lengths, left):
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(real_lengths):
        if left:
            mask[b, T - n:] = True
        else:
            mask[b, :n] = True
    return mask


# The fixed k keeps these cases free of the question whether k counts padded positions. include_first
# is only tested with right padding: with left padding, token 0 is a pad and the SPEC's two rules clash.
PADDING_CASES = [
    pytest.param(201, 13, [13, 6], False, {"k": 4, "include_first": False}, torch.bool,
                 id="right-bool-T13-k4"),
    pytest.param(202, 13, [9, 4], False, {"k": 4, "include_first": True}, torch.long,
                 id="right-int-T13-k4-first"),
    pytest.param(203, 13, [5, 13], True, {"k": 3, "include_first": False}, torch.bool,
                 id="left-bool-T13-k3"),
    pytest.param(204, 33, [7, 20], True, {"k": 7, "include_first": False}, torch.long,
                 id="left-int-T33-k7"),
]


@pytest.mark.parametrize("seed, T, real_lengths, left, layer_kwargs, mask_dtype", PADDING_CASES)
def test_padded_positions_never_selected(seed, T, real_lengths, left, layer_kwargs, mask_dtype, request):
    B = len(real_lengths)
    layer = _make_layer(3, 8, seed, **layer_kwargs)
    x = _x(B, T, seed)
    mask = _right_and_left_padded_mask(B, T, real_lengths, left)
    # Give pads the highest router logits of every head, so that a layer ignoring the mask would pick them.
    with torch.no_grad():
        for b in range(B):
            for t in range(T):
                if not mask[b, t]:
                    x[b, t] = 4.0 * layer.router.weight.sum(0) / layer.router.weight.sum(0).norm()
        y = layer(x, attention_mask=mask.to(mask_dtype))
        expected = _oracle_for(layer, x, layer_kwargs, attention_mask=mask, order_seed=seed)
        unmasked = _oracle_for(layer, x, layer_kwargs, order_seed=seed)
    case = request.node.callspec.id
    assert not torch.equal(expected, unmasked), f"{case}: pads would not have been picked; weak case"
    assert bool((y[~mask] == 0).all()), f"{case}: nonzero output at padded positions: {y[~mask].abs().max()}"
    _assert_matches(y, expected, case)


# ------------------------------------------------------------------------------------------ rope positions

def test_rope_uses_original_positions_not_ranks():
    layer_kwargs = {"k": 4, "include_first": False, "rotate_fraction": 1.0}
    layer = _make_layer(3, 8, 301, **layer_kwargs)
    x = _x(2, 33, 301)
    with torch.no_grad():
        y = layer(x)
        expected = _oracle_for(layer, x, layer_kwargs, order_seed=301)
        by_rank = _oracle_for(layer, x, layer_kwargs, order_seed=301, rank_positions=True)
    # Rank and original positions differ in their gaps (RoPE only sees differences), so the two oracles differ.
    separation = (expected - by_rank).abs().max().item()
    assert separation > 1e-3, f"weak case: rank-position oracle within {separation:.3e} of the true one"
    _assert_matches(y, expected, "rope-original-positions")
    assert (y - by_rank).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------ checks of the oracle alone

def test_oracle_selection_order_does_not_matter():
    generator = torch.Generator().manual_seed(401)
    x = torch.randn(2, 13, HIDDEN, generator=generator, dtype=torch.float64)
    weights = (0.5 * torch.randn(3, HIDDEN, generator=generator, dtype=torch.float64),
               0.3 * torch.randn(3, HIDDEN, 24, generator=generator, dtype=torch.float64),
               0.3 * torch.randn(3, 8, HIDDEN, generator=generator, dtype=torch.float64))
    outputs = [mosa_oracle(x, *weights, sparsity=3, include_first=True, order_seed=s) for s in range(3)]
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("T, sparsity, k, expected", [
    (2, 3, None, 2), (3, 4, None, 2), (7, 2, None, 3), (13, 4, None, 3), (33, 2, None, 16), (2, 2, None, 2),
    (33, None, 2, 2), (7, None, 7, 7),
])
def test_oracle_num_selected(T, sparsity, k, expected):
    assert _num_selected(T, sparsity, k) == expected


def test_layer_parameter_layout():
    layer = _make_layer(3, 6, 501, sparsity=2)
    assert {name: tuple(p.shape) for name, p in layer.named_parameters()} == {
        "router.weight": (3, HIDDEN), "w_qkv": (3, HIDDEN, 18), "w_o": (3, 6, HIDDEN)}
    assert layer.router.bias is None
