"""The fused Triton MoSA op against the reference: output and all four gradients, at small odd shapes.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the file is skipped when Triton is not installed.
"""

import pytest
import torch

pytest.importorskip("triton")

from torch_mosa.ops import dispatch  # noqa: E402
from torch_mosa.ops.mosa import mosa_attention  # noqa: E402
from torch_mosa.ops.mosa.reference import mosa_attention_reference  # noqa: E402
from torch_mosa.ops.selection.reference import topk_route_reference  # noqa: E402
from torch_mosa.ops.mosa import triton_mosa  # noqa: E402
from torch_mosa.ops.mosa.triton_mosa import _accumulator_rows, _mosa_fwd_op, mosa_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 end to end (three-pass tf32 dots on a GPU): measured ~3e-7 in the interpreter
FP32_RTOL = 1e-5


def assert_close(name, actual, expected, rtol):
    """Relative RMS error ||a - e|| / ||e|| below rtol (plus an absolute floor for all-zero references)."""
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten memory?)"
    error = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    assert error <= rtol * scale + 1e-12, f"{name}: relative error {error / max(scale, 1e-30):.3e} > {rtol:.1e}"


def test_reference_ignores_autocast():
    """Under bf16 autocast (as `mosa leak` and `mosa eval` run on a GPU) the reference computes as without it: its
    einsums would otherwise give bf16 head outputs that the float32 sum rejects (a scatter dtype error)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 13, 12, generator=g)
    w_qkv, w_o = torch.randn(3, 12, 24, generator=g), torch.randn(3, 8, 12, generator=g)
    indices, scores = topk_route_reference(torch.randn(2, 3, 13, generator=g), 5, True, None)
    expected = mosa_attention_reference(x, w_qkv, w_o, indices, scores, rotary_dim=4, rope_base=1e4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = mosa_attention_reference(x, w_qkv, w_o, indices, scores, rotary_dim=4, rope_base=1e4)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def make_case(batch, seq_len, hidden, num_heads, head_dim, k, include_first, padded, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, hidden, generator=g)
    w_qkv = torch.randn(num_heads, hidden, 3 * head_dim, generator=g) / hidden ** 0.5
    w_o = torch.randn(num_heads, head_dim, hidden, generator=g) / head_dim ** 0.5
    logits = torch.randn(batch, num_heads, seq_len, generator=g)
    mask = None
    if padded:  # left padding on the first sequence: fewer real tokens than k there, so padding slots appear
        mask = torch.ones(batch, seq_len, dtype=torch.bool)
        mask[0, : seq_len - k + 1] = False
    grad_y = torch.randn(batch, seq_len, hidden, generator=g)
    to = dict(device=DEVICE)
    return [t.to(**to) for t in (x, w_qkv, w_o, logits, grad_y)], (None if mask is None else mask.to(**to))


def run_op(op, tensors, mask, k, include_first, rotary_dim):
    x, w_qkv, w_o, grad_y = (t.detach().clone().requires_grad_(i < 3) for i, t in enumerate(tensors[:3] + [tensors[4]]))
    indices, scores = topk_route_reference(tensors[3], k, include_first, mask)
    if mask is not None:
        assert (scores == 0).any(), "the padded case must produce score-0 padding slots"
    scores.requires_grad_()
    y = op(x, w_qkv, w_o, indices, scores, rotary_dim, 10000.0)
    y.backward(grad_y)
    return [y.detach(), x.grad, w_qkv.grad, w_o.grad, scores.grad]


def run_router_op(op, tensors, router_weight, mask, k, include_first, rotary_dim):
    """The op with the router's gradient taken inside it: scores = sigmoid(x . router_weight) at the selection."""
    x, w_qkv, w_o, w_router, grad_y = (t.detach().clone().requires_grad_()
                                       for t in (tensors[0], tensors[1], tensors[2], router_weight, tensors[4]))
    logits = torch.einsum("eh,bth->bet", w_router.detach().to(x.dtype), x.detach())
    indices, scores = topk_route_reference(logits, k, include_first, mask)
    y = op(x, w_qkv, w_o, indices, scores, rotary_dim, 10000.0, router_weight=w_router)
    y.backward(grad_y)
    return [y.detach(), x.grad, w_qkv.grad, w_o.grad, w_router.grad]


def triton_op(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base, router_weight=None, **packed):
    return mosa_attention_triton(x, w_qkv, w_o, indices, scores, rotary_dim=rotary_dim, rope_base=rope_base,
                                 router_weight=router_weight, **packed)


CASES = [
    # batch, seq_len, hidden, heads, head_dim, k, include_first, padded, rotary_dim
    pytest.param(1, 9, 20, 2, 8, 2, True, False, 4, id="k2-B1-include_first"),
    pytest.param(2, 13, 24, 3, 16, 4, False, False, 8, id="k4-T13-B2"),
    pytest.param(3, 37, 40, 5, 32, 16, True, True, 16, id="k16-T37-padded"),
    pytest.param(2, 29, 24, 2, 16, 5, False, False, 0, id="k5-no-rope"),
    pytest.param(2, 29, 24, 2, 16, 5, True, False, 16, id="k5-full-rope"),
    pytest.param(2, 150, 24, 2, 16, 80, False, True, 8, id="k80-two-tile-rows-padded"),
    pytest.param(5, 23, 36, 1, 24, 7, True, False, 12, id="d24-odd-heads"),
]


@pytest.mark.parametrize("batch,seq_len,hidden,num_heads,head_dim,k,include_first,padded,rotary_dim", CASES)
def test_forward_and_gradients_match_reference(nan_allocations, mosa_kernel_path, monkeypatch, batch, seq_len,
                                               hidden, num_heads, head_dim, k, include_first, padded, rotary_dim):
    if DEVICE == "cpu":  # the float32 limit is the GPU's shared memory; the interpreter runs 128-row tiles too
        monkeypatch.setattr(triton_mosa, "MAX_FUSED_K_FP32", triton_mosa.MAX_FUSED_K)
    tensors, mask = make_case(batch, seq_len, hidden, num_heads, head_dim, k, include_first, padded, seed=k + batch)
    expected = run_op(mosa_attention_reference, tensors, mask, k, include_first, rotary_dim)
    actual = run_op(triton_op, tensors, mask, k, include_first, rotary_dim)
    for name, a, e in zip(("y", "dx", "dw_qkv", "dw_o", "dscores"), actual, expected):
        assert_close(name, a, e, FP32_RTOL)


@pytest.mark.parametrize("batch,seq_len,k,include_first,padded", [
    pytest.param(33, 40, 16, True, False, id="k16-B33-128-row-forward-tiles"),
    pytest.param(3, 33, 5, False, True, id="k5-B3-padded"),
])
def test_half_precision_matches_reference(nan_allocations, mosa_kernel_path, batch, seq_len, k, include_first, padded):
    """float16 through the kernels (Triton's interpreter computes bfloat16 tl.dot wrongly; float16 runs the same
    16-bit code) against the float64 reference on the same float16-rounded inputs: relative error of the output and
    every gradient under 1e-2. Batch 33 x k 16 = 528 rows takes the forward's 128-row tiles (16-bit, k <= 16,
    at least 512 rows)."""
    tensors, mask = make_case(batch, seq_len, 32, 2, 16, k, include_first, padded, seed=batch * k)
    half = [t.half() for t in tensors]
    if batch * k >= 512:
        assert triton_mosa._forward_tile_config(batch, k, 16, 8, torch.float16)["block_m"] == 128
    expected = run_op(mosa_attention_reference, [t.double() for t in half], mask, k, include_first, 8)
    actual = run_op(triton_op, half, mask, k, include_first, 8)
    for name, a, e in zip(("y", "dx", "dw_qkv", "dw_o", "dscores"), actual, expected):
        assert a.dtype == (torch.float32 if name == "dscores" else torch.float16), name  # the scores are fp32
        assert_close(name, a, e, 1e-2)


@pytest.mark.parametrize("group", [1, 2, 3, 0])
@pytest.mark.parametrize("path", ["split", "split-output-kernel", "fused", "wide"])
def test_program_orders_match_reference(nan_allocations, monkeypatch, group, path):
    """Every (tile, head) program of every kernel runs exactly once whatever TILE_GROUP orders them in: runs of 1
    (heads fastest), 2 or 3 tiles (a shorter last run: 4 tiles each) or all (tiles fastest). 13 sequences of 16
    slots: 4 row-kernel tiles of 4 groups, 4 projection, dx and output tiles of 64 float32 rows (the wide path:
    its limit lowered to k 8). The split path also with its forward's output kernel (SPLIT_OUTPUT_KERNEL)."""
    wide_from = 8 if path == "wide" else triton_mosa.MAX_FUSED_K
    monkeypatch.setattr(triton_mosa, "MAX_FUSED_K", wide_from)
    monkeypatch.setattr(triton_mosa, "MAX_FUSED_K_FP32", wide_from)
    monkeypatch.setattr(triton_mosa, "SPLIT_PROJECTION", path != "fused")
    monkeypatch.setattr(triton_mosa, "SPLIT_OUTPUT_KERNEL", path == "split-output-kernel")
    monkeypatch.setattr(triton_mosa, "TILE_GROUP", {name: group for name in triton_mosa.TILE_GROUP})
    assert triton_mosa._forward_tile_config(13, 16, 16, 8, torch.float32)["num_tiles"] == 4
    assert triton_mosa._split_launch("dx", 13 * 16, torch.float32)["tiles"] == 4
    tensors, mask = make_case(13, 40, 24, 3, 16, 16, True, False, seed=group)
    expected = run_op(mosa_attention_reference, tensors, mask, 16, True, 8)
    actual = run_op(triton_op, tensors, mask, 16, True, 8)
    for name, a, e in zip(("y", "dx", "dw_qkv", "dw_o", "dscores"), actual, expected):
        assert_close(name, a, e, FP32_RTOL)


@pytest.mark.parametrize("group", [-1, 1.5, True])
def test_program_order_must_be_a_count_of_tiles(monkeypatch, group):
    monkeypatch.setattr(triton_mosa, "TILE_GROUP", {**triton_mosa.TILE_GROUP, "dx": group})
    tensors, mask = make_case(2, 20, 16, 2, 16, 16, False, False, seed=0)
    with pytest.raises(ValueError, match="TILE_GROUP"):
        run_op(triton_op, tensors, mask, 16, False, 8)


def test_float32_weights_with_half_inputs(nan_allocations, mosa_kernel_path):
    """Autocast's case: float32 parameters (w_qkv, w_o, the router) with float16 x. The kernels read the weights in
    x's dtype and return their gradients in float32 (no 16-bit weight copy per step); the result matches the float64
    reference of the float16-rounded weights, and the reference path given the same mixed inputs rounds them the
    same way (bitwise equal to rounding them first)."""
    tensors, mask = make_case(3, 37, 40, 5, 32, 16, True, True, seed=11)
    router_weight = torch.randn(5, 40, device=DEVICE) / 40 ** 0.5
    mixed = [tensors[0].half(), tensors[1], tensors[2], tensors[3], tensors[4].half()]
    rounded = [t.half() if t.is_floating_point() else t for t in mixed]
    expected = run_router_op(mosa_attention_reference, [t.double() for t in rounded], router_weight.half().double(),
                             mask, 16, True, 16)
    actual = run_router_op(triton_op, mixed, router_weight, mask, 16, True, 16)
    for name, a, e in zip(("y", "dx", "dw_qkv", "dw_o", "dw_router"), actual, expected):
        assert a.dtype == (torch.float16 if name in ("y", "dx") else torch.float32), name
        assert_close(name, a, e, 1e-2)
    by_reference = run_router_op(mosa_attention_reference, mixed, router_weight, mask, 16, True, 16)
    pre_rounded = run_router_op(mosa_attention_reference, rounded, router_weight.half(), mask, 16, True, 16)
    for name, a, e in zip(("y", "dx", "dw_qkv", "dw_o", "dw_router"), by_reference, pre_rounded):
        assert a.dtype == (torch.float16 if name in ("y", "dx") else torch.float32), name
        assert torch.equal(a.float(), e.float()), name


def test_weights_of_another_dtype_are_refused():
    tensors, _ = make_case(1, 9, 20, 2, 8, 2, True, False, seed=0)
    x, w_qkv, w_o, logits = tensors[:4]
    indices, scores = topk_route_reference(logits, 2, True, None)
    with pytest.raises(ValueError, match="w_qkv .* must be of x's dtype torch.float32"):
        triton_op(x, w_qkv.half(), w_o.half(), indices, scores, 4, 10000.0)
    with pytest.raises(ValueError, match="router_weight must be .* of dtype torch.float16 or torch.float32"):
        triton_op(x.half(), w_qkv, w_o, indices, scores, 4, 10000.0,
                  router_weight=torch.zeros(2, 20, device=DEVICE, dtype=torch.float64))


@pytest.mark.parametrize("batch,seq_len,hidden,num_heads,head_dim,k,include_first,padded,rotary_dim", CASES[1:4])
def test_router_gradient_inside_the_op_matches_reference(nan_allocations, mosa_kernel_path, batch, seq_len, hidden,
                                                          num_heads, head_dim, k, include_first, padded, rotary_dim):
    tensors, mask = make_case(batch, seq_len, hidden, num_heads, head_dim, k, include_first, padded, seed=k + 7)
    router_weight = torch.randn(num_heads, hidden, device=DEVICE) / hidden ** 0.5
    expected = run_router_op(mosa_attention_reference, tensors, router_weight, mask, k, include_first, rotary_dim)
    actual = run_router_op(triton_op, tensors, router_weight, mask, k, include_first, rotary_dim)
    for name, a, e in zip(("y", "dx", "dw_qkv", "dw_o", "dw_router"), actual, expected):
        assert_close(name, a, e, FP32_RTOL)


PACKED_CASES = [
    # document lengths per row (each row sums to seq_len), hidden, heads, head_dim, sparsity, rotary_dim, router
    pytest.param([[1, 2, 9, 13], [25]], 24, 3, 16, 4, 8, False, id="docs-1-2-9-13"),
    pytest.param([[7, 1, 17], [2, 2, 21]], 20, 2, 8, 3, 4, True, id="docs-router"),
    pytest.param([[40, 1, 12], [53]], 16, 2, 16, 4, 16, True, id="docs-full-rope-two-groups"),
]


@pytest.mark.parametrize("lengths,hidden,num_heads,head_dim,sparsity,rotary_dim,router", PACKED_CASES)
def test_packed_documents_match_reference(nan_allocations, mosa_kernel_path, lengths, hidden, num_heads, head_dim,
                                          sparsity, rotary_dim, router):
    """Per-document selection (k_d slots per document) and the kernels' document mask and restarted RoPE
    positions against the reference, output and gradients."""
    from torch_mosa.ops.documents import document_layout
    from torch_mosa.ops.selection import topk_route_documents

    ids = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths])
    layout = document_layout(ids.to(DEVICE))
    batch, seq_len = ids.shape
    g = torch.Generator().manual_seed(seq_len + hidden)
    x = torch.randn(batch, seq_len, hidden, generator=g).to(DEVICE)
    w_qkv = (torch.randn(num_heads, hidden, 3 * head_dim, generator=g) / hidden ** 0.5).to(DEVICE)
    w_o = (torch.randn(num_heads, head_dim, hidden, generator=g) / head_dim ** 0.5).to(DEVICE)
    w_router = (torch.randn(num_heads, hidden, generator=g) / hidden ** 0.5).to(DEVICE)
    grad_y = torch.randn(batch, seq_len, hidden, generator=g).to(DEVICE)
    indices, scores = topk_route_documents(torch.einsum("eh,bth->bet", w_router, x), layout, sparsity, None, True)
    assert (scores == 0).any() or indices.shape[-1] == seq_len // sparsity  # rows of unequal slot counts pad
    results = []
    for op in (mosa_attention_reference, triton_op):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w_qkv, w_o, w_router if router else scores)]
        extra = dict(router_weight=leaves[3]) if router else {}
        y = op(leaves[0], leaves[1], leaves[2], indices, scores if router else leaves[3], rotary_dim, 10000.0,
               positions=layout.rope_positions, document_ids=layout.ids, **extra)
        y.backward(grad_y)
        results.append([y.detach()] + [leaf.grad for leaf in leaves])
    for name, a, e in zip(("y", "dx", "dw_qkv", "dw_o", "d_router_or_scores"), results[1], results[0]):
        assert_close(name, a, e, FP32_RTOL)


def test_document_mask_matters():
    """The reference keeps documents apart: the same selection with one document gives another output."""
    g = torch.Generator().manual_seed(2)
    x, w_qkv, w_o = torch.randn(1, 10, 8, generator=g), torch.randn(2, 8, 12, generator=g), torch.randn(2, 4, 8, generator=g)
    indices = torch.tensor([[[0, 3, 6, 9], [1, 2, 5, 8]]])
    scores = torch.rand(1, 2, 4, generator=g) + 0.5
    ids = torch.tensor([[0] * 5 + [1] * 5])
    y_docs = mosa_attention_reference(x, w_qkv, w_o, indices, scores, 4, 1e4, document_ids=ids)
    y_one = mosa_attention_reference(x, w_qkv, w_o, indices, scores, 4, 1e4)
    assert torch.allclose(y_docs[:, :5], y_one[:, :5]) and not torch.allclose(y_docs[:, 5:], y_one[:, 5:])


def test_reference_router_mode_equals_differentiable_scores():
    """The reference's router mode gives the gradients of plain autograd through sigmoid(gather(x @ w_r^T))."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 17, 12, dtype=torch.float64, generator=g, requires_grad=True)
    w_qkv = torch.randn(3, 12, 24, dtype=torch.float64, generator=g, requires_grad=True)
    w_o = torch.randn(3, 8, 12, dtype=torch.float64, generator=g, requires_grad=True)
    w_router = torch.randn(3, 12, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, :14] = False  # 3 real tokens for k = 5: padding slots
    grad_y = torch.randn(2, 17, 12, dtype=torch.float64, generator=g)
    logits = torch.einsum("eh,bth->bet", w_router, x)
    indices, scores = topk_route_reference(logits, 5, True, mask)
    plain_scores = torch.sigmoid(logits.gather(-1, indices)) * (scores != 0)
    grads = []
    for kwargs in (dict(scores=plain_scores), dict(scores=scores, router_weight=w_router)):
        y = mosa_attention_reference(x, w_qkv, w_o, indices, rotary_dim=4, rope_base=1e4, **kwargs)
        grads.append(torch.autograd.grad(y, (x, w_qkv, w_o, w_router), grad_y))
    for plain, fused in zip(*grads):
        torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)


def test_accumulator_modes():
    """Selections covering under half the tokens accumulate in a compact buffer (one row per picked token)."""
    indices = torch.tensor([[[1, 4], [4, 7]]])
    dest, rows, tokens = _accumulator_rows(indices, seq_len=20)
    assert rows == 4 and tokens is not None and dest[0, 0, 1] == dest[0, 1, 0]
    dest, rows, tokens = _accumulator_rows(indices, seq_len=6)
    assert rows == 6 and tokens is None and dest.tolist() == indices.tolist()


def test_wrong_weights_fail():
    """The comparison can fail: a perturbed w_o must be caught."""
    tensors, mask = make_case(2, 13, 24, 3, 16, 4, False, False, seed=3)
    expected = run_op(mosa_attention_reference, tensors, mask, 4, False, 8)
    tensors[2] = tensors[2] * 1.001
    actual = run_op(triton_op, tensors, mask, 4, False, 8)
    with pytest.raises(AssertionError):
        assert_close("y", actual[0], expected[0], FP32_RTOL)


def test_argument_checks():
    x = torch.randn(2, 8, 16)
    w_qkv, w_o = torch.randn(3, 16, 24), torch.randn(3, 8, 16)
    indices = torch.zeros(2, 3, 4, dtype=torch.long)
    scores = torch.ones(2, 3, 4)
    with pytest.raises(ValueError, match="w_o"):
        mosa_attention_triton(x, w_qkv, w_o[:, :4], indices, scores, rotary_dim=4, rope_base=1e4)
    with pytest.raises(ValueError, match="rotary_dim"):
        mosa_attention_triton(x, w_qkv, w_o, indices, scores, rotary_dim=3, rope_base=1e4)
    with pytest.raises(ValueError, match="dtype"):
        mosa_attention_triton(x, w_qkv.double(), w_o, indices, scores, rotary_dim=4, rope_base=1e4)


WIDE_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # (interpreter: no bf16)


@pytest.mark.parametrize("dtype", WIDE_DTYPES)
@pytest.mark.parametrize("router", [False, True], ids=["scores-grad", "router-grad-in-op"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_wide_selections_match_reference(nan_allocations, monkeypatch, dtype, router, deterministic):
    """k above MAX_FUSED_K (the row kernels' tiles) takes the wide path: the split path's kernels around PyTorch's
    attention (ops/mosa/group_attention.py). Output and every gradient against the float64 reference on the same
    rounded inputs (float32 1e-5, 16-bit 1e-2), left padding included, with atomics and with the fixed-order
    combine."""
    calls = []
    backward = triton_mosa.group_attention_backward
    monkeypatch.setattr(triton_mosa, "group_attention_backward", lambda *a, **kw: calls.append(1) or backward(*a, **kw))
    k = triton_mosa.MAX_FUSED_K + 9
    tensors, mask = make_case(2, k + 40, 24, 3, 16, k, True, True, seed=11)
    rounded = [t.to(dtype) for t in tensors]
    router_weight = torch.randn(3, 24, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)

    def op(*args, **kwargs):
        return triton_mosa.fused_mosa_attention(*args[:7], kwargs.get("router_weight"), deterministic=deterministic)

    if router:
        actual = run_router_op(op, rounded, router_weight, mask, k, True, 8)
        expected = run_router_op(mosa_attention_reference, [t.double() for t in rounded], router_weight.double(),
                                 mask, k, True, 8)
    else:
        actual = run_op(op, rounded, mask, k, True, 8)
        expected = run_op(mosa_attention_reference, [t.double() for t in rounded], mask, k, True, 8)
    assert calls == [1]
    for name, a, e in zip(("y", "dx", "dw_qkv", "dw_o", "dlast"), actual, expected):
        assert a.dtype == (torch.float32 if name == "dlast" and not router else dtype), name
        assert_close(name, a, e, FP32_RTOL if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("rotary_dim", [0, 6, 16])
def test_rope_rows_kernel_rotates_as_the_reference_and_back(rotary_dim):
    """The wide path's RoPE kernel on rows of a wider buffer: rotated as ops.rope.apply_rope rotates (float32),
    and its inverse undoes it (rotation by minus the angle)."""
    from torch_mosa.ops.rope import apply_rope

    g = torch.Generator().manual_seed(rotary_dim)
    rows, head_dim, seq_len = 37, 16, 50
    buffer = torch.randn(rows, 3 * head_dim, generator=g).to(DEVICE)
    positions = torch.randint(0, seq_len, (rows,), generator=g).to(DEVICE, torch.int32)
    tables = triton_mosa._rope_tables(seq_len, rotary_dim, 1e4, buffer.device)
    rotated = torch.empty(rows, head_dim, device=DEVICE)
    triton_mosa._rotate_rows(buffer[:, head_dim:], rotated, positions, *tables, rotary_dim, head_dim, 3 * head_dim,
                             head_dim)
    expected = apply_rope(buffer[:, head_dim:2 * head_dim], positions.long(), rotary_dim, 1e4)
    torch.testing.assert_close(rotated, expected, rtol=1e-5, atol=1e-5)
    back = torch.zeros(rows, 3 * head_dim, device=DEVICE)
    triton_mosa._rotate_rows(rotated, back[:, head_dim:], positions, *tables, rotary_dim, head_dim, head_dim,
                             3 * head_dim, inverse=True)
    torch.testing.assert_close(back[:, head_dim:2 * head_dim], buffer[:, head_dim:2 * head_dim], rtol=1e-5,
                               atol=1e-5)
    assert (back[:, :head_dim] == 0).all() and (back[:, 2 * head_dim:] == 0).all()  # nothing outside its columns


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wide_selections_of_packed_documents_match_reference(nan_allocations, monkeypatch, dtype):
    """The wide path's attention keeps each slot inside its document and rotates it by its restarted position:
    packed rows of documents long enough for k > MAX_FUSED_K slots, router gradient in the op, against the float64
    reference."""
    from torch_mosa.ops.documents import document_layout
    from torch_mosa.ops.selection import topk_route_documents

    monkeypatch.setattr(triton_mosa, "MAX_FUSED_K", 24)  # wide from k = 25: small enough for the interpreter
    monkeypatch.setattr(triton_mosa, "MAX_FUSED_K_FP32", 24)
    calls = []
    backward = triton_mosa.group_attention_backward
    monkeypatch.setattr(triton_mosa, "group_attention_backward", lambda *a, **kw: calls.append(1) or backward(*a, **kw))
    lengths = [[41, 3, 70], [9, 105]]
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths])
    layout = document_layout(ids.to(DEVICE))
    batch, seq_len = ids.shape
    num_heads, hidden, head_dim = 3, 20, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, seq_len, hidden, generator=g).to(DEVICE, dtype)
    w_qkv = (torch.randn(num_heads, hidden, 3 * head_dim, generator=g) / hidden ** 0.5).to(DEVICE, dtype)
    w_o = (torch.randn(num_heads, head_dim, hidden, generator=g) / head_dim ** 0.5).to(DEVICE, dtype)
    w_router = (torch.randn(num_heads, hidden, generator=g) / hidden ** 0.5).to(DEVICE, dtype)
    grad_y = torch.randn(batch, seq_len, hidden, generator=g).to(DEVICE, dtype)
    indices, scores = topk_route_documents(torch.einsum("eh,bth->bet", w_router.double(), x.double()), layout, 4,
                                           None, True)
    assert indices.shape[-1] > 24 and (scores == 0).any()
    results = []
    for op, cast in ((mosa_attention_reference, torch.float64), (triton_op, dtype)):
        leaves = [t.detach().clone().to(cast).requires_grad_() for t in (x, w_qkv, w_o, w_router)]
        y = op(leaves[0], leaves[1], leaves[2], indices, scores.to(cast), 8, 10000.0, router_weight=leaves[3],
               positions=layout.rope_positions, document_ids=layout.ids)
        y.backward(grad_y.to(cast))
        results.append([y.detach()] + [leaf.grad for leaf in leaves])
    assert calls == [1]
    for name, a, e in zip(("y", "dx", "dw_qkv", "dw_o", "dw_router"), results[1], results[0]):
        assert_close(name, a, e, FP32_RTOL if dtype == torch.float32 else 1e-2)


def test_custom_op_registration(mosa_kernel_path):
    """Schema, fake (meta) implementation and autograd registration as torch.compile needs them (the fake's saved
    tensor is O on the fused path, Q|K|V on the split path)."""
    tensors, _ = make_case(2, 11, 16, 2, 16, 3, False, False, seed=5)
    x, w_qkv, w_o, logits, _ = tensors
    indices, scores = topk_route_reference(logits, 3, False)
    w_router = torch.randn(2, 16, device=DEVICE)
    for router, score_grad in ((None, True), (w_router.requires_grad_(), False)):
        ids = torch.tensor([[0] * 4 + [1] * 7, [0] * 11], device=DEVICE, dtype=torch.int32)
        for packed, deterministic in (((None, None), False), ((None, None), True),
                                      ((torch.arange(11, device=DEVICE, dtype=torch.int32).expand(2, -1).contiguous(),
                                        ids), False)):
            args = (x.requires_grad_(), w_qkv.requires_grad_(), w_o.requires_grad_(), router, indices,
                    scores.detach().requires_grad_(score_grad), 8, 10000.0, *packed, deterministic, mosa_kernel_path)
            torch.library.opcheck(_mosa_fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                                  "test_autograd_registration"))


def test_custom_op_registration_of_the_wide_path(monkeypatch):
    """opcheck on a selection too wide for the row kernels: the fake keeps Q|K|V (the wide path's saved tensor)
    whichever path flag the caller passed."""
    monkeypatch.setattr(triton_mosa, "MAX_FUSED_K", 2)
    monkeypatch.setattr(triton_mosa, "MAX_FUSED_K_FP32", 2)
    tensors, _ = make_case(2, 11, 16, 2, 16, 3, False, False, seed=6)
    x, w_qkv, w_o, logits, _ = tensors
    indices, scores = topk_route_reference(logits, 3, False)
    for split in (False, True):
        args = (x.requires_grad_(), w_qkv.requires_grad_(), w_o.requires_grad_(), None, indices,
                scores.detach().requires_grad_(), 8, 10000.0, None, None, False, split)
        torch.library.opcheck(_mosa_fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                              "test_autograd_registration"))


def test_backward_follows_the_path_the_forward_took(monkeypatch):
    """The forward keeps O (fused path) or Q|K|V (split path) for the backward, which tells them apart by width, so
    switching `SPLIT_PROJECTION` between a forward and its backward changes nothing."""
    tensors, _ = make_case(2, 13, 24, 3, 16, 4, False, False, seed=8)
    expected = run_op(mosa_attention_reference, tensors, None, 4, False, 8)
    for forward_split in (False, True):
        monkeypatch.setattr(triton_mosa, "SPLIT_PROJECTION", forward_split)
        x, w_qkv, w_o = (t.detach().clone().requires_grad_() for t in tensors[:3])
        indices, scores = topk_route_reference(tensors[3], 4, False)
        scores.requires_grad_()
        y = triton_op(x, w_qkv, w_o, indices, scores, 8, 10000.0)
        saved = y.grad_fn.saved_tensors[6]
        assert saved.shape == (3, 2 * 4, 48 if forward_split else 16)
        monkeypatch.setattr(triton_mosa, "SPLIT_PROJECTION", not forward_split)
        y.backward(tensors[4])
        for name, a, e in zip(("y", "dx", "dw_qkv", "dw_o", "dscores"),
                              [y.detach(), x.grad, w_qkv.grad, w_o.grad, scores.grad], expected):
            assert_close(name, a, e, FP32_RTOL)


def test_compiled_op_follows_the_switch(monkeypatch):
    """The path is an argument of the custom op, chosen outside it, so a compiled caller guards on
    `SPLIT_PROJECTION`: flipping it recompiles instead of running a graph traced for the other path's saved
    tensor (Inductor would reject its shape)."""
    tensors, _ = make_case(2, 13, 24, 3, 16, 4, False, False, seed=9)
    expected = run_op(mosa_attention_reference, tensors, None, 4, False, 8)
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(triton_op, backend=backend, fullgraph=True)
    for split in (False, True, False):
        monkeypatch.setattr(triton_mosa, "SPLIT_PROJECTION", split)
        actual = run_op(compiled, tensors, None, 4, False, 8)
        for name, a, e in zip(("y", "dx", "dw_qkv", "dw_o", "dscores"), actual, expected):
            assert_close(name, a, e, FP32_RTOL)
    assert len(graphs) == 2  # one per path; the third call reuses the first graph


def test_eager_function_equals_the_custom_op(monkeypatch):
    """Eager calls skip the custom ops' dispatch (an autograd.Function over the same forward and backward);
    torch.compile traces the custom ops. Both give the same output and gradients, bit for bit."""
    tensors, _ = make_case(2, 13, 24, 3, 16, 4, False, False, seed=3)
    x, w_qkv, w_o, logits, _ = tensors
    indices, scores = topk_route_reference(logits, 4, False)
    w_router = torch.randn(3, 24, device=DEVICE)
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        leaves = [t.detach().clone().requires_grad_() for t in (x, w_qkv, w_o, w_router)]
        y = triton_mosa.fused_mosa_attention(leaves[0], leaves[1], leaves[2], indices, scores, 8, 1e4, leaves[3])
        assert ("mosa_attention_fwd" if compiling else "_EagerMosaFunction") in type(y.grad_fn).__name__
        y.backward(torch.ones_like(y))
        results.append([y.detach()] + [leaf.grad for leaf in leaves])
    for eager, traced in zip(*results):
        assert torch.equal(eager, traced)


def test_dispatch_takes_reference_off_cuda():
    x = torch.randn(1, 6, 8)
    assert not dispatch.use_fast_path(x)
    w_qkv, w_o = torch.randn(2, 8, 24), torch.randn(2, 8, 8)
    indices = torch.tensor([[[0, 2, 5], [1, 3, 4]]])
    scores = torch.rand(1, 2, 3)
    y = mosa_attention(x, w_qkv, w_o, indices, scores, rotary_dim=4, rope_base=1e4)
    torch.testing.assert_close(y, mosa_attention_reference(x, w_qkv, w_o, indices, scores, 4, 1e4))
    with dispatch.fast_path(False):
        assert not dispatch.fast_path_enabled()


def test_deterministic_mode_takes_the_fixed_order_combine(monkeypatch):
    """The kernels' fp32 atomics are not reproducible bit for bit: under torch.use_deterministic_algorithms(True)
    the dispatch point asks the kernels for one output row per slot, summed by token in a fixed order."""
    import torch_mosa.ops.mosa as mosa_ops

    calls = []
    monkeypatch.setattr(mosa_ops, "use_fast_path", lambda x: True)
    monkeypatch.setattr(triton_mosa, "fused_mosa_attention", lambda *args: calls.append(args[-1]) or args[0])
    x, w_qkv, w_o = torch.randn(1, 6, 8), torch.randn(2, 8, 24), torch.randn(2, 8, 8)
    indices, scores = torch.tensor([[[0, 2, 5], [1, 3, 4]]]), torch.rand(1, 2, 3)
    mosa_attention(x, w_qkv, w_o, indices, scores, rotary_dim=4, rope_base=1e4)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        mosa_attention(x, w_qkv, w_o, indices, scores, rotary_dim=4, rope_base=1e4)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert calls == [False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("router", [False, True], ids=["scores-grad", "router-grad-in-op"])
def test_deterministic_combine_matches_reference(nan_allocations, mosa_kernel_path, dtype, router):
    """The per-slot rows and their fixed-order sum give the reference's output and gradients (float32 within
    1e-5, float16 within 1e-2 of the float64 reference on the rounded inputs), with padding slots and a token
    picked by several heads (include_first)."""
    batch, seq_len, hidden, num_heads, head_dim, k, rotary_dim = 3, 37, 40, 5, 32, 16, 16
    tensors, mask = make_case(batch, seq_len, hidden, num_heads, head_dim, k, True, True, seed=11)
    tensors = [t.to(dtype) for t in tensors]
    router_weight = (torch.randn(num_heads, hidden) / hidden ** 0.5).to(DEVICE, dtype)

    def deterministic_op(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base, router_weight=None):
        return triton_mosa.fused_mosa_attention(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base,
                                                router_weight, deterministic=True)

    double = [t.double() for t in tensors]
    if router:
        expected = run_router_op(mosa_attention_reference, double, router_weight.double(), mask, k, True,
                                 rotary_dim)
        actual = run_router_op(deterministic_op, tensors, router_weight, mask, k, True, rotary_dim)
    else:
        expected = run_op(mosa_attention_reference, double, mask, k, True, rotary_dim)
        actual = run_op(deterministic_op, tensors, mask, k, True, rotary_dim)
    for name, a, e in zip(("y", "dx", "dw_qkv", "dw_o", "dlast"), actual, expected):
        assert_close(name, a, e, FP32_RTOL if dtype == torch.float32 else 1e-2)


def test_combine_sums_every_slot_of_a_token_in_one_order():
    """_combine_slots: rows of the slots that picked a token add up in that token, others stay 0; run twice,
    bitwise equal."""
    indices = torch.tensor([[[0, 2, 5], [0, 3, 5]]])  # tokens 0 and 5 picked by both heads
    rows = torch.randn(6, 4)
    out = triton_mosa._combine_slots(rows, indices, (1, 7, 4), torch.float32)
    expected = torch.zeros(7, 4)
    for row, token in enumerate(indices.reshape(-1).tolist()):
        expected[token] += rows[row]
    torch.testing.assert_close(out[0], expected)
    assert torch.equal(out, triton_mosa._combine_slots(rows, indices, (1, 7, 4), torch.float32))


def test_dispatch_by_dtype_and_thread():
    """float64 never takes the kernels; a fast_path(False) block in one thread leaves other threads alone."""
    import threading

    assert not dispatch.use_fast_path(torch.randn(1, 2, 2, dtype=torch.float64))
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other_thread():
        inside.wait()
        seen["other"] = dispatch.fast_path_enabled()
        release.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with dispatch.fast_path(False):
        inside.set()
        release.wait(timeout=10)
        seen["inside"] = dispatch.fast_path_enabled()
    worker.join()
    assert seen == {"inside": False, "other": dispatch.fast_path_enabled()} and seen["other"]


def test_packed_lm_through_the_kernels_equals_the_reference(monkeypatch):
    """A hybrid MoSA LM on packed rows with every dispatch point forced onto the kernels (the interpreter off CUDA):
    per-document selection kernel and fused op give the reference path's logits and gradients."""
    import torch_mosa.ops.mosa as mosa_ops
    import torch_mosa.ops.selection as selection_ops
    from torch_mosa import MoSAConfig, MoSALM

    monkeypatch.setattr(triton_mosa, "MAX_FUSED_K_FP32", triton_mosa.MAX_FUSED_K)
    torch.manual_seed(0)
    model = MoSALM(MoSAConfig.from_preset("micro", attention="mosa", sparsity=4, vocab_size=40, num_layers=1,
                                          hidden_size=32, ffn_size=64, head_dim=16, max_seq_len=64)).to(DEVICE)
    ids = torch.randint(0, 40, (2, 45), device=DEVICE)
    documents = torch.tensor([[0] * 1 + [1] * 13 + [2] * 31, [0] * 45], device=DEVICE)
    results = []
    for fast in (False, True):
        monkeypatch.setattr(mosa_ops, "use_fast_path", lambda x, fast=fast: fast)
        monkeypatch.setattr(selection_ops, "use_fast_path", lambda x, fast=fast: fast)
        model.zero_grad()
        logits, loss = model(ids, ids.roll(-1, 1), document_ids=documents)
        loss.backward()
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    for reference, fused in zip(*results):
        assert_close("packed LM", fused, reference, FP32_RTOL)


def test_lm_with_every_untimed_setting_equals_the_reference(monkeypatch):
    """The settings not yet on by default, all at once, through a whole hybrid MoSA LM (k 16: the split path):
    programs in runs of 2 tiles, the split forward's output kernel, the weights split (16-bit only, so idle here)
    and the selection by sort give the reference path's logits and gradients."""
    import torch_mosa.ops.mosa as mosa_ops
    import torch_mosa.ops.selection as selection_ops
    from torch_mosa import MoSAConfig, MoSALM
    from torch_mosa.ops.selection import triton_selection

    monkeypatch.setattr(triton_mosa, "MAX_FUSED_K_FP32", triton_mosa.MAX_FUSED_K)
    monkeypatch.setattr(triton_mosa, "TILE_GROUP", {name: 2 for name in triton_mosa.TILE_GROUP})
    monkeypatch.setattr(triton_mosa, "SPLIT_OUTPUT_KERNEL", True)
    monkeypatch.setattr(triton_mosa, "WEIGHTS_SPLIT", True)
    monkeypatch.setattr(triton_selection, "SELECT_BY_SORT", True)
    torch.manual_seed(1)
    model = MoSALM(MoSAConfig.from_preset("micro", attention="mosa", sparsity=4, vocab_size=40, num_layers=1,
                                          hidden_size=32, ffn_size=64, head_dim=16, max_seq_len=64)).to(DEVICE)
    ids = torch.randint(0, 40, (5, 64), device=DEVICE)
    results = []
    for fast in (False, True):
        monkeypatch.setattr(mosa_ops, "use_fast_path", lambda x, fast=fast: fast)
        monkeypatch.setattr(selection_ops, "use_fast_path", lambda x, fast=fast: fast)
        model.zero_grad()
        logits, loss = model(ids, ids.roll(-1, 1))
        loss.backward()
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    for reference, fused in zip(*results):
        assert_close("LM, every untimed setting", fused, reference, FP32_RTOL)
