"""The fused decode step of sparse heads against the reference: output, appended keys and values, head counts and
the capacity-overflow counter, with a head-slot list or all heads, some heads full, at small odd sizes.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import pytest
import torch

pytest.importorskip("triton")

from torch_mosa.ops.decode import sparse_decode  # noqa: E402
from torch_mosa.ops.decode.reference import sparse_decode_reference  # noqa: E402
from torch_mosa.ops.decode import triton_decode  # noqa: E402
from torch_mosa.ops.decode.triton_decode import grouped_decode, sparse_decode_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_step(batch, hidden, num_heads, head_dim, capacity, width, seed, dtype=torch.float32):
    """Random weights, a cache part-filled (head 0 of row 0 full), and a token's routing over `width` head slots
    (None: all heads)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, hidden, generator=g)
    w_qkv = torch.randn(num_heads, hidden, 3 * head_dim, generator=g) / hidden ** 0.5
    w_o = torch.randn(num_heads, head_dim, hidden, generator=g) / head_dim ** 0.5
    cache_k = torch.randn(batch, num_heads, capacity + 1, head_dim, generator=g)
    cache_v = torch.randn(batch, num_heads, capacity + 1, head_dim, generator=g)
    counts = torch.randint(0, capacity + 1, (batch, num_heads), generator=g)
    counts[0, 0] = capacity
    if width is None:
        heads = None
        joined = torch.rand(batch, num_heads, generator=g) < 0.6
    else:
        # distinct heads per row, as routing gives them; row 0's first slot the full head 0, joined: an overflow
        heads = torch.stack([torch.randperm(num_heads, generator=g)[:width] for _ in range(batch)])
        heads[0] = torch.cat([torch.zeros(1, dtype=torch.long), heads[0][heads[0] != 0]])[:width]
        joined = torch.rand(batch, width, generator=g) < 0.7
    joined[0, 0] = True
    scores = torch.rand(joined.shape, generator=g)
    position = torch.tensor([int(counts.max()) + 3])
    to = dict(device=DEVICE)
    tensors = [t.to(**to) for t in (x, w_qkv, w_o)]
    tensors = [t.to(dtype) for t in tensors]
    cache = [cache_k.to(dtype=dtype, **to), cache_v.to(dtype=dtype, **to), counts.to(**to),
             torch.zeros((), dtype=torch.long, device=DEVICE)]
    route = [None if heads is None else heads.to(**to), joined.to(**to), scores.to(**to), position.to(**to)]
    return tensors, route, cache


def run(op, tensors, route, cache, rotary_dim):
    x, w_qkv, w_o = tensors
    heads, joined, scores, position = route
    cache = [t.clone() for t in cache]
    out = op(x, heads, joined, scores, position, w_qkv, w_o, *cache, rotary_dim, 10000.0)
    return out, cache


CASES = [
    # batch, hidden, heads, head_dim, capacity, width (None: all heads), rotary_dim
    pytest.param(1, 40, 5, 16, 7, 2, 8, id="B1-J2"),
    pytest.param(3, 24, 6, 8, 40, None, 4, id="all-heads-cap40"),
    pytest.param(2, 72, 9, 32, 33, 4, 0, id="no-rope"),
    pytest.param(2, 20, 3, 16, 5, 3, 16, id="full-rope-J=E"),
]


# GROUPED_PAIRS_PER_HEAD forcing each way of running the step: grouped by head (one batched GEMM, one program per
# (row, head)) or per (row, slot) pair
GROUPINGS = [pytest.param(0, id="grouped"), pytest.param(10 ** 9, id="per-pair")]


@pytest.mark.parametrize("pairs_per_head", GROUPINGS)
@pytest.mark.parametrize("batch,hidden,num_heads,head_dim,capacity,width,rotary_dim", CASES)
def test_fused_decode_matches_reference(monkeypatch, pairs_per_head, batch, hidden, num_heads, head_dim, capacity,
                                        width, rotary_dim):
    monkeypatch.setattr(triton_decode, "GROUPED_PAIRS_PER_HEAD", pairs_per_head)
    tensors, route, cache = make_step(batch, hidden, num_heads, head_dim, capacity, width, seed=capacity)
    expected, expected_cache = run(sparse_decode_reference, tensors, route, cache, rotary_dim)
    actual, actual_cache = run(sparse_decode_triton, tensors, route, cache, rotary_dim)
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-6)
    held = torch.arange(capacity + 1, device=DEVICE) < expected_cache[2][..., None]  # the scratch slot may differ
    for name, a, e in zip(("k", "v"), actual_cache[:2], expected_cache[:2]):
        torch.testing.assert_close(a[held], e[held], rtol=2e-5, atol=2e-6, msg=name)
    assert torch.equal(actual_cache[2], expected_cache[2]), "counts"
    assert int(actual_cache[3]) == int(expected_cache[3]) >= 1, "capacity overflow"


@pytest.mark.parametrize("pairs_per_head", GROUPINGS)
def test_fused_decode_in_half_precision(monkeypatch, pairs_per_head):
    monkeypatch.setattr(triton_decode, "GROUPED_PAIRS_PER_HEAD", pairs_per_head)
    tensors, route, cache = make_step(2, 48, 5, 16, 12, 3, seed=4, dtype=torch.float16)
    expected, _ = run(sparse_decode_reference, [t.float() for t in tensors], route,
                      [t.float() if t.is_floating_point() else t for t in cache], 8)
    actual, _ = run(sparse_decode_triton, tensors, route, cache, 8)
    assert actual.dtype == torch.float16
    torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("pairs_per_head", GROUPINGS)
def test_wrong_cache_count_fails(monkeypatch, pairs_per_head):
    """The comparison can fail: a decode that sees one held token fewer differs."""
    monkeypatch.setattr(triton_decode, "GROUPED_PAIRS_PER_HEAD", pairs_per_head)
    tensors, route, cache = make_step(1, 40, 5, 16, 7, None, seed=1)
    expected, _ = run(sparse_decode_reference, tensors, route, cache, 8)
    cache[2] = (cache[2] - 1).clamp(min=0)
    actual, _ = run(sparse_decode_triton, tensors, route, cache, 8)
    assert not torch.allclose(actual, expected, rtol=2e-5, atol=2e-6)


def test_dispatch_takes_the_reference_off_cuda():
    tensors, route, cache = make_step(1, 16, 2, 8, 4, None, seed=2)
    x, w_qkv, w_o = tensors
    out = sparse_decode(x.cpu(), None, route[1].cpu(), route[2].cpu(), route[3].cpu(), w_qkv.cpu(), w_o.cpu(),
                        *[t.clone().cpu() for t in cache], rotary_dim=4, rope_base=1e4)
    expected, _ = run(sparse_decode_reference, [t.cpu() for t in tensors], [None] + [t.cpu() for t in route[1:]],
                      [t.cpu() for t in cache], 4)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("pairs_per_head", GROUPINGS)
def test_custom_op_registration(monkeypatch, pairs_per_head):
    """Schema (with the cache mutations declared) and fake implementation, as torch.compile needs them."""
    monkeypatch.setattr(triton_decode, "GROUPED_PAIRS_PER_HEAD", pairs_per_head)
    for width in (None, 2):
        tensors, route, cache = make_step(2, 24, 4, 8, 6, width, seed=3)
        x, w_qkv, w_o = tensors
        args = (x, *route, w_qkv, w_o, *cache, 4, 10000.0)
        torch.library.opcheck(sparse_decode_triton, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
@pytest.mark.parametrize("batch,num_heads,capacity,width", [(1, 17, 64, None), (32, 17, 64, 4), (1, 505, 48, 16),
                                                            (32, 505, 1024, None), (32, 17, 40, 5),
                                                            (32, 505, 48, 5)])
def test_fused_decode_in_bfloat16_on_the_gpu(batch, num_heads, capacity, width):
    """Tiny-model shapes (h 512, d 64, rotary 32) in bfloat16 against the float64 reference: relative RMS error
    of the output under 1e-2, appended keys and values under 1e-2, counts and overflow exact. The 4 + 17 model's
    B=32 step (17 heads, J=5) runs grouped by head, the IsoFLOP model's (505 heads) per pair."""
    g = torch.Generator().manual_seed(batch + num_heads)
    hidden, head_dim = 512, 64
    x = torch.randn(batch, hidden, generator=g)
    w_qkv = torch.randn(num_heads, hidden, 3 * head_dim, generator=g) / hidden ** 0.5
    w_o = torch.randn(num_heads, head_dim, hidden, generator=g) / head_dim ** 0.5
    cache = torch.randn(2, batch, num_heads, capacity + 1, head_dim, generator=g)
    counts = torch.randint(0, capacity + 1, (batch, num_heads), generator=g)
    heads = None if width is None else torch.stack([torch.randperm(num_heads, generator=g)[:width]
                                                    for _ in range(batch)])
    joined = torch.rand(batch, num_heads if width is None else width, generator=g) < 0.5
    scores = torch.rand(joined.shape, generator=g)
    position = torch.tensor([capacity + 7])
    bf16 = [t.cuda().bfloat16() for t in (x, w_qkv, w_o, cache[0], cache[1])]
    results = []
    for inputs, dtype in ((bf16, torch.bfloat16), ([t.double() for t in bf16], torch.float64)):
        x_, w_qkv_, w_o_, k_, v_ = [t.clone() for t in inputs]
        counts_, overflow = counts.clone().cuda(), torch.zeros((), dtype=torch.long, device="cuda")
        op = sparse_decode_triton if dtype == torch.bfloat16 else sparse_decode_reference
        out = op(x_, None if heads is None else heads.cuda(), joined.cuda(), scores.cuda().to(dtype),
                 position.cuda(), w_qkv_, w_o_, k_, v_, counts_, overflow, 32, 10000.0)
        results.append((out, k_, v_, counts_, overflow))
    (out, k, v, counts_fused, overflow_fused), (out64, k64, v64, counts64, overflow64) = results
    error = ((out.double() - out64).norm() / out64.norm().clamp_min(1e-30)).item()
    assert error < 1e-2, error
    held = torch.arange(capacity + 1, device="cuda") < counts64[..., None]
    for a, e in ((k, k64), (v, v64)):
        assert ((a[held].double() - e[held]).norm() / e[held].norm()).item() < 1e-2
    assert torch.equal(counts_fused, counts64) and int(overflow_fused) == int(overflow64)


def test_grouping_rule():
    """Grouped by head from eight (row, slot) pairs per head: the 4 + 17 model (J=5) from B=28 on, not at B=16 nor
    the IsoFLOP model's 505 heads at B=32; all 17 heads from B=8."""
    assert grouped_decode(32, 5, 17) and grouped_decode(28, 5, 17) and not grouped_decode(27, 5, 17)
    assert not grouped_decode(16, 5, 17) and not grouped_decode(32, 5, 505)
    assert grouped_decode(8, 17, 17) and not grouped_decode(7, 17, 17)


@pytest.mark.parametrize("pairs_per_head", GROUPINGS)
@pytest.mark.parametrize("attention", ["mosa", "fixed-per-head"])
def test_fused_decode_inside_the_model_equals_the_full_causal_forward(monkeypatch, attention, pairs_per_head):
    """The kernels wired into SparseHeads.decode_step (forced on, in the interpreter off CUDA): prefill + cached
    decode equals the full causal forward of the model, with a head limit that bites (MoSA) or per-head strides."""
    import torch_mosa.ops.decode as decode_ops
    from torch_mosa import MoSAConfig, MoSALM
    from torch_mosa.inference import calibrate_causal_thresholds, decode_one_token, new_cache, prefill

    calls = []
    monkeypatch.setattr(triton_decode, "GROUPED_PAIRS_PER_HEAD", pairs_per_head)
    monkeypatch.setattr(decode_ops, "use_fast_path", lambda x: True)
    monkeypatch.setattr(triton_decode, "sparse_decode_triton",
                        lambda *args: calls.append(1) or sparse_decode_triton(*args))
    kind, extra = ("fixed", dict(fixed_offsets="per_head")) if attention == "fixed-per-head" else ("mosa", {})
    torch.manual_seed(0)
    model = MoSALM(MoSAConfig.from_preset("micro", attention=kind, sparsity=4, vocab_size=50, num_layers=1,
                                          **extra)).eval().to(DEVICE)
    if model.mosa_layers:
        calibrate_causal_thresholds(model, [torch.randint(0, 50, (2, 40), device=DEVICE)])
        model.mosa_layers[0].set_causal_limits(heads_per_token=3)
    ids = torch.randint(0, 50, (2, 30), device=DEVICE)
    with torch.no_grad():
        full, _ = model(ids, routing="causal")
        cache = new_cache(model, 2, 30, torch.float32, ids.device)
        prefill(model, ids[:, :12], torch.ones(2, 12, dtype=torch.bool, device=DEVICE), cache)
        for t in range(12, 30):
            torch.testing.assert_close(decode_one_token(model, ids[:, t:t + 1], t, cache), full[:, t],
                                       rtol=1e-4, atol=1e-4)
    assert len(calls) == 18  # one decode step per new token, the kernels each time
