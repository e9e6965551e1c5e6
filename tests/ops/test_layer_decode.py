"""The fused layer decode step (dense and MoSA heads of one layer in one kernel, then one output kernel) against
the reference: output, the dense cache's new keys, values and real-token mark, the MoSA heads' appended keys and
values, counts and both overflow counters; dense only, MoSA only and both, with and without a head limit, left
padding, full heads. Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import pytest
import torch

pytest.importorskip("triton")

from torch_mosa.ops.decode import DenseDecodeInputs, MoSADecodeInputs, layer_decode, layer_decode_arguments  # noqa: E402,E501
from torch_mosa.ops.decode import reference as decode_reference  # noqa: E402
from torch_mosa.ops.decode.triton_decode import layer_decode_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def thresholds_between_logits(logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per head a threshold in the widest gap between its rows' logits (or 0.25 beyond all of them), so no logit lies
    within rounding distance of its threshold: the kernel's router dot and the reference's matmul then route alike."""
    values = logits.double().sort(dim=0).values  # [B, E]
    edges = torch.cat([values[:1] - 0.25, values, values[-1:] + 0.25])
    gaps = edges[1:] - edges[:-1] + 1e-3 * torch.rand(edges.shape[0] - 1, logits.shape[1], generator=g,
                                                       dtype=torch.float64)  # ties (B=1) broken at random
    pick = gaps.argmax(dim=0)
    cols = torch.arange(logits.shape[1])
    return ((edges[pick, cols] + edges[pick + 1, cols]) / 2).float()


def thresholds_with_separated_margins(logits: torch.Tensor, heads_per_token: int, g: torch.Generator):
    """One row's logits [1, E] -> thresholds that put heads_per_token + 3 heads above (head 0 first), their margins
    0.2 apart: which J heads have the largest margins then does not depend on rounding."""
    num_heads = logits.shape[1]
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(num_heads - 1, generator=g)])
    margins = torch.empty(num_heads, dtype=torch.float64)
    above = min(heads_per_token + 3, num_heads)
    margins[order[:above]] = 0.2 * torch.arange(above, 0, -1, dtype=torch.float64)
    margins[order[above:]] = -0.2 * torch.arange(1, num_heads - above + 1, dtype=torch.float64)
    return (logits[0].double() - margins).float()


def make_layer(batch, hidden, dense_heads, mosa_heads, head_dim, max_len, capacity, heads_per_token, seed,
               mark_real=True):
    """Random weights and caches on the CPU in float64: the dense cache filled to `position` with left padding
    (row b's first b positions not real), the MoSA cache part-filled with head 0 of row 0 full."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, hidden, generator=g, dtype=torch.float64)
    position = torch.tensor([max_len - 3])
    dense = mosa = None
    if dense_heads:
        qkv = torch.randn(batch, dense_heads * 3 * head_dim, generator=g, dtype=torch.float64)
        w_o = torch.randn(hidden, dense_heads * head_dim, generator=g, dtype=torch.float64) / head_dim ** 0.5
        k, v = torch.randn(2, batch, dense_heads, max_len, head_dim, generator=g, dtype=torch.float64)
        slots = torch.arange(max_len)
        key_real = (slots < position) & (slots >= torch.arange(batch)[:, None])
        key_real[:, int(position) + 1] = True  # stale marks past `position` must not be attended
        dense = DenseDecodeInputs(qkv, w_o, k, v, key_real, mark_real)
    if mosa_heads:
        router = torch.randn(mosa_heads, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5
        w_qkv = torch.randn(mosa_heads, hidden, 3 * head_dim, generator=g, dtype=torch.float64) / hidden ** 0.5
        w_o = torch.randn(mosa_heads, head_dim, hidden, generator=g, dtype=torch.float64) / head_dim ** 0.5
        k, v = torch.randn(2, batch, mosa_heads, capacity + 1, head_dim, generator=g, dtype=torch.float64)
        counts = torch.randint(0, capacity + 1, (batch, mosa_heads), generator=g)
        counts[0, 0] = capacity
        thresholds = thresholds_between_logits(x @ router.t(), g)
        thresholds[0] = -10.0  # every row joins head 0: row 0's join overflows the full head
        mosa = MoSADecodeInputs(router, thresholds, heads_per_token, w_qkv, w_o, k, v, counts,
                                torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long))
    return x, position, dense, mosa


def cast(x, position, dense, mosa, dtype, device):
    """A copy in `dtype` on `device` (index, mask and counter tensors keep their dtypes)."""
    def to(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(device).clone()
        return t.to(dtype) if t.is_floating_point() and t.dim() > 1 else t

    dense = None if dense is None else DenseDecodeInputs(*map(to, dense))
    mosa = None if mosa is None else MoSADecodeInputs(*map(to, mosa))
    return to(x), position.to(device), dense, mosa


def run(op, x, position, dense, mosa, rotary_dim):
    args = layer_decode_arguments(x, position, dense, mosa, rotary_dim, 10000.0)
    return (decode_reference.layer_decode_reference if op == "reference" else layer_decode_triton)(*args)


def assert_step_matches(expected, actual, position, atol, rtol, elementwise_output=True):
    """Output (elementwise within atol, rtol; elementwise_output=False: the caller bounds its RMS error instead), the
    caches' new entries, marks, counts and overflow counters."""
    (out64, _, dense64, mosa64), (out, _, dense, mosa) = expected, actual
    if elementwise_output:
        torch.testing.assert_close(out.double(), out64, atol=atol, rtol=rtol)
    if dense64 is not None:
        p = int(position)
        for a, e in ((dense.k, dense64.k), (dense.v, dense64.v)):
            torch.testing.assert_close(a[:, :, p].double(), e[:, :, p], atol=atol, rtol=rtol)
        assert torch.equal(dense.key_real.cpu(), dense64.key_real.cpu())
    if mosa64 is not None:
        held = torch.arange(mosa64.k.shape[2], device=mosa64.k.device) < mosa64.counts[..., None]
        for a, e in ((mosa.k, mosa64.k), (mosa.v, mosa64.v)):
            torch.testing.assert_close(a[held].double(), e[held], atol=atol, rtol=rtol)
        assert torch.equal(mosa.counts, mosa64.counts)
        assert int(mosa.capacity_overflow) == int(mosa64.capacity_overflow) >= 1
        assert int(mosa.token_overflow) == int(mosa64.token_overflow)


CASES = [
    # batch, hidden, dense heads, MoSA heads, head_dim, max_len, capacity, heads_per_token, rotary_dim, mark_real
    pytest.param(1, 40, 3, 0, 16, 21, 0, None, 8, True, id="dense-only"),
    pytest.param(3, 24, 0, 5, 8, 30, 6, None, 4, True, id="mosa-only-unlimited"),
    pytest.param(2, 40, 2, 6, 16, 37, 9, 2, 8, False, id="both-J2"),
    pytest.param(3, 72, 4, 7, 32, 19, 5, 3, 0, True, id="both-no-rope"),
    pytest.param(2, 20, 1, 3, 16, 11, 4, None, 16, True, id="both-full-rope"),
]


@pytest.mark.parametrize("batch,hidden,dense_heads,mosa_heads,head_dim,max_len,capacity,limit,rotary_dim,mark", CASES)
def test_layer_step_matches_float64_reference(batch, hidden, dense_heads, mosa_heads, head_dim, max_len, capacity,
                                              limit, rotary_dim, mark):
    """The fused layer step against the float64 reference."""
    inputs = make_layer(batch, hidden, dense_heads, mosa_heads, head_dim, max_len, capacity, limit, seed=max_len,
                        mark_real=mark)
    expected = cast(*inputs, torch.float64, DEVICE)
    actual = cast(*inputs, torch.float32, DEVICE)
    out64 = run("reference", *expected, rotary_dim)
    out = run("fused", *actual, rotary_dim)
    assert_step_matches((out64, *expected[:1], *expected[2:]), (out, *actual[:1], *actual[2:]), inputs[1],
                        atol=2e-5, rtol=2e-5)


def test_left_padding_longer_than_a_block_of_positions():
    """A row whose left padding fills the dense heads' first block of positions (DENSE_BLOCK_SLOTS) and more: that
    block adds nothing to the online softmax (it made the row NaN until session 9), and an empty sparse head (count
    0) attends to the new token alone."""
    from torch_mosa.ops.decode.triton_decode import DENSE_BLOCK_SLOTS

    max_len = DENSE_BLOCK_SLOTS + 23
    x, position, dense, mosa = make_layer(2, 40, 2, 3, 16, max_len, 4, None, seed=5)
    key_real = dense.key_real.clone()
    key_real[1, :DENSE_BLOCK_SLOTS + 10] = False
    counts = mosa.counts.clone()
    counts[1] = 0
    inputs = (x, position, dense._replace(key_real=key_real), mosa._replace(counts=counts))
    expected = cast(*inputs, torch.float64, DEVICE)
    actual = cast(*inputs, torch.float32, DEVICE)
    out64 = run("reference", *expected, 8)
    out = run("fused", *actual, 8)
    assert torch.isfinite(out).all()
    assert_step_matches((out64, *expected[:1], *expected[2:]), (out, *actual[:1], *actual[2:]), position,
                        atol=2e-5, rtol=2e-5)


def test_head_limit_overflow_is_counted():
    """More heads above their thresholds than heads_per_token: the joins beyond the limit are counted, once per row."""
    x, position, dense, mosa = make_layer(2, 24, 1, 6, 8, 15, 5, 2, seed=3)
    mosa = mosa._replace(thresholds=torch.full((6,), -10.0))  # every head passes: 4 joins dropped per row
    for op, dtype in (("reference", torch.float64), ("fused", torch.float32)):
        step = cast(x, position, dense, mosa, dtype, DEVICE)
        run(op, *step, 8)
        assert int(step[3].token_overflow) == 8


def test_half_precision_matches_reference():
    """fp16 (the interpreter's stand-in for bf16: same 16-bit code, and Triton 3.6's interpreter computes bf16
    wrongly only in tl.dot, which the decode kernels do not use) against float64."""
    inputs = make_layer(2, 64, 2, 5, 16, 25, 7, 3, seed=11)
    expected = cast(*inputs, torch.float64, DEVICE)
    actual = cast(*inputs, torch.float16, DEVICE)
    out64 = run("reference", *expected, 8)
    out = run("fused", *actual, 8)
    assert_step_matches((out64, *expected[:1], *expected[2:]), (out, *actual[:1], *actual[2:]), inputs[1],
                        atol=2e-2, rtol=2e-2)


def test_dispatch_takes_the_reference_off_cuda(monkeypatch):
    """layer_decode on CPU tensors runs the reference (the kernels are not called)."""
    import torch_mosa.ops.decode.triton_decode as triton_decode

    monkeypatch.setattr(triton_decode, "layer_decode_triton", lambda *a: pytest.fail("kernel called"))
    x, position, dense, mosa = make_layer(1, 24, 1, 3, 8, 9, 4, None, seed=0)
    assert layer_decode(x, position, dense, mosa, rotary_dim=4, rope_base=10000.0).shape == (1, 24)


def test_bad_arguments():
    x, position, dense, mosa = make_layer(1, 24, 1, 3, 8, 9, 4, None, seed=0)

    def call(dense=dense, mosa=mosa, x=x, position=position, rotary_dim=4):
        return layer_decode(x, position, dense, mosa, rotary_dim=rotary_dim, rope_base=10000.0)

    with pytest.raises(ValueError, match="neither"):
        call(dense=None, mosa=None)
    with pytest.raises(ValueError, match="heads_per_token"):
        call(mosa=mosa._replace(heads_per_token=0))
    with pytest.raises(ValueError, match=r"dense.qkv must have shape \[1, 24\]"):
        call(dense=dense._replace(qkv=dense.qkv[:, :-1]))
    with pytest.raises(ValueError, match=r"mosa.w_o must have shape \[3, 8, 24\]"):
        call(mosa=mosa._replace(w_o=mosa.w_o.transpose(1, 2)))
    with pytest.raises(ValueError, match="share head_dim"):
        call(dense=dense._replace(k=dense.k[..., :4], v=dense.v[..., :4], qkv=dense.qkv[:, :12], w_o=dense.w_o[:, :4]))
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        call(rotary_dim=3)
    with pytest.raises(ValueError, match="position must be a one-element long tensor"):
        call(position=position.float())


@pytest.mark.cuda
@pytest.mark.parametrize("batch,dense_heads,mosa_heads,limit", [(1, 4, 17, 5), (5, 4, 17, None), (3, 9, 0, None),
                                                                (1, 0, 33, 4), (2, 4, 33, None), (32, 4, 17, None)])
def test_layer_step_in_bfloat16_on_the_gpu(batch, dense_heads, mosa_heads, limit):
    """Tiny-model shapes (h 512, d 64, rotary 32, 392 positions, capacity 28) in bfloat16 against the float64
    reference on the same (bf16-rounded) inputs: output within 1e-2 relative RMS, appended keys and values within
    2e-2, counts, marks and overflows exact. A head limit that bites is tested at B=1 with margins set apart."""
    g = torch.Generator().manual_seed(batch + mosa_heads)
    x, position, dense, mosa = cast(*make_layer(batch, 512, dense_heads, mosa_heads, 64, 392, 28, limit,
                                                seed=batch + mosa_heads), torch.bfloat16, "cuda")
    if mosa is not None:
        logits = (x.double() @ mosa.router_weight.double().t()).cpu()
        thresholds = thresholds_with_separated_margins(logits, limit, g) if limit else \
            thresholds_between_logits(logits, g)
        if not limit:
            thresholds[0] = -10.0  # every row joins the full head 0 of row 0: a capacity overflow
        mosa = mosa._replace(thresholds=thresholds.cuda())
    actual = (x, position, dense, mosa)
    expected = cast(*actual, torch.float64, "cuda")
    out64 = run("reference", *expected, 32)
    out = run("fused", *actual, 32)
    assert_step_matches((out64, *expected[:1], *expected[2:]), (out, *actual[:1], *actual[2:]), position,
                        atol=2e-2, rtol=2e-2, elementwise_output=False)
    error = ((out.double() - out64).norm() / out64.norm()).item()
    assert error < 1e-2, error


@pytest.mark.parametrize("attention,extra", [("mosa", dict(num_sparse_heads=7)), ("dense", {}),
                                             ("pure_mosa", dict(num_sparse_heads=5))])
def test_fused_layer_step_inside_the_model_equals_the_full_causal_forward(monkeypatch, attention, extra):
    """The fused step wired into the layers' decode steps (forced on, in the interpreter off CUDA), float32:
    prefill of left-padded prompts of different lengths + cached decode equals the full causal forward at every
    step, with a head limit that bites, and each step takes the fused kernels."""
    import torch_mosa.layers.hybrid as hybrid
    import torch_mosa.ops.decode as decode_ops
    import torch_mosa.ops.decode.triton_decode as triton_decode
    from torch_mosa import MoSAConfig, MoSALM
    from torch_mosa.inference import calibrate_causal_thresholds, decode_one_token, new_cache, prefill

    calls = []
    monkeypatch.setattr(decode_ops, "use_fast_path", lambda x: True)
    monkeypatch.setattr(hybrid, "use_fast_path", lambda x: True)
    monkeypatch.setattr(triton_decode, "layer_decode_triton",
                        lambda *args: calls.append(1) or layer_decode_triton(*args))
    torch.manual_seed(0)
    config = MoSAConfig.from_preset("micro", attention=attention, sparsity=None if attention == "dense" else 4,
                                    vocab_size=50, num_layers=2, **extra)
    model = MoSALM(config).eval().to(DEVICE)
    if model.mosa_layers:
        calibrate_causal_thresholds(model, [torch.randint(0, 50, (2, 40), device=DEVICE)])
        for layer in model.mosa_layers:
            layer.set_causal_limits(heads_per_token=2)
    lengths, width = (26, 15), 26
    ids = torch.randint(0, 50, (2, width), device=DEVICE)
    mask = torch.arange(width, device=DEVICE) >= width - torch.tensor(lengths, device=DEVICE)[:, None]
    ids = ids.masked_fill(~mask, 0)
    prompt_len = 12
    with torch.no_grad():
        full, _ = model(ids, attention_mask=mask, routing="causal")
        cache = new_cache(model, 2, width, torch.float32, ids.device)
        prefill(model, ids[:, :prompt_len], mask[:, :prompt_len], cache)
        for t in range(prompt_len, width):
            torch.testing.assert_close(decode_one_token(model, ids[:, t:t + 1], t, cache), full[:, t],
                                       rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * (width - prompt_len)  # both layers, every step
    if model.mosa_layers:
        assert sum(int(c.token_overflow) for layer in cache for c in layer.parts() if hasattr(c, "token_overflow"))


def test_which_layers_take_the_fused_step():
    """Up to 64 MoSA heads at any batch (the 4 + 17 model), not the IsoFLOP model's 505."""
    from torch_mosa.ops.decode import layer_decode_suits

    assert layer_decode_suits(1, 17, 5) and layer_decode_suits(16, 17, 5) and layer_decode_suits(64, 17, 5)
    assert not layer_decode_suits(1, 505, 8)
    assert layer_decode_suits(1, 64, None) and not layer_decode_suits(1, 65, None)
