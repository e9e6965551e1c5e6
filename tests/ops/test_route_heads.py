"""A new token's causal routing to at most J heads (`route_heads`): the route kernel against the reference (heads in
the same order, joined flags, scores, the count of joins beyond J), with ties, heads below their thresholds and
every head above; and the argument check.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import pytest
import torch

pytest.importorskip("triton")

from torch_mosa.ops.decode import route_heads  # noqa: E402
from torch_mosa.ops.decode.reference import route_heads_reference  # noqa: E402
from torch_mosa.ops.decode.triton_decode import route_heads_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_logits(batch, num_heads, seed, dtype=torch.float32, ties=True):
    """Logits on a coarse grid (so margins tie) around per-head thresholds; row 0 has every head above."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_heads, generator=g)
    thresholds = torch.randn(num_heads, generator=g) * 0.5
    if ties:
        logits, thresholds = (logits * 4).round() / 4, (thresholds * 4).round() / 4
    logits[0] = thresholds + 1.0 + torch.rand(num_heads, generator=g)
    return logits.to(DEVICE, dtype), thresholds.to(DEVICE, dtype)


def both(logits, thresholds, heads_per_token):
    results = []
    for op in (route_heads_reference, route_heads_triton):
        overflow = torch.zeros((), dtype=torch.long, device=DEVICE)
        results.append((*op(logits, thresholds, overflow, heads_per_token), overflow))
    return results


@pytest.mark.parametrize("batch,num_heads,heads_per_token,dtype", [
    (3, 37, 5, torch.float32), (2, 5, 5, torch.float32), (4, 70, 1, torch.float32), (3, 33, 9, torch.float16),
    (1, 130, 21, torch.float32)])
def test_route_kernel_matches_reference(batch, num_heads, heads_per_token, dtype):
    logits, thresholds = make_logits(batch, num_heads, seed=num_heads, dtype=dtype)
    (heads, joined, scores, overflow), (heads_k, joined_k, scores_k, overflow_k) = both(logits, thresholds,
                                                                                        heads_per_token)
    assert torch.equal(heads_k, heads), "heads (order included)"
    assert torch.equal(joined_k, joined) and joined_k.dtype == torch.bool
    torch.testing.assert_close(scores_k, scores, rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=1e-6)
    assert int(overflow_k) == int(overflow)
    above = (logits > thresholds).sum(-1)
    assert int(overflow) == int((above - heads_per_token).clamp(min=0).sum())
    assert bool(joined[0].all()), "row 0 has every head above its threshold"


@pytest.mark.parametrize("heads_per_token,heads,joined,overflow", [
    (1, [1], [True], 3),  # margins 2.0 (heads 1 and 3) tie: the lower index wins
    (2, [1, 3], [True, True], 2),
    (3, [1, 2, 3], [True, True, True], 1),  # written in head order
    (5, [0, 1, 2, 3, 4], [True, True, True, True, False], 0),  # head 4 fills the slot left over, not joined
])
def test_which_heads_and_in_what_order(heads_per_token, heads, joined, overflow):
    """The J largest margins, equal margins by lower head index, slots left over by the lowest other heads; in
    head order."""
    logits = torch.tensor([[0.5, 2.0, 1.0, 2.0, -1.0, 3.0]], device=DEVICE)
    thresholds = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0], device=DEVICE)
    for op in (route_heads_reference, route_heads_triton):
        counter = torch.zeros((), dtype=torch.long, device=DEVICE)
        got_heads, got_joined, scores = op(logits, thresholds, counter, heads_per_token)
        assert got_heads.tolist() == [heads] and got_joined.tolist() == [joined], op.__name__
        assert int(counter) == overflow
        torch.testing.assert_close(scores, torch.sigmoid(logits[:, heads]))


@pytest.mark.parametrize("threshold_dtype", [torch.float16, torch.float32])
def test_margins_tie_in_the_dtype_torch_computes_them_in(threshold_dtype):
    """Half-precision logits: with half thresholds torch rounds the margins to half and the first three tie at 1.0
    (the lower indices win); with fp32 thresholds they are 0.99976, 1.0 and 1.00024 (heads 2 and 1 win)."""
    logits = torch.tensor([[1.0, 1.0009765625, 1.0009765625, 0.5]], dtype=torch.float16, device=DEVICE)
    thresholds = torch.tensor([0.000244140625, 0.0009765625, 0.000732421875, 0.0], device=DEVICE,
                              dtype=threshold_dtype)
    (heads, joined, _, overflow), (heads_k, joined_k, _, overflow_k) = both(logits, thresholds, 2)
    assert torch.equal(heads_k, heads) and torch.equal(joined_k, joined) and int(overflow_k) == int(overflow) == 2
    assert heads.tolist() == [[0, 1] if threshold_dtype == torch.float16 else [1, 2]]


def test_heads_per_token_is_checked():
    logits, thresholds = make_logits(1, 4, seed=0)
    overflow = torch.zeros((), dtype=torch.long, device=DEVICE)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="heads_per_token must be in 1..4"):
            route_heads(logits, thresholds, overflow, bad)


def test_custom_op_registration():
    logits, thresholds = make_logits(2, 9, seed=1)
    overflow = torch.zeros((), dtype=torch.long, device=DEVICE)
    torch.library.opcheck(route_heads_triton, (logits, thresholds, overflow, 3),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
def test_route_kernel_in_bfloat16_on_the_gpu():
    """The IsoFLOP Tiny shape (505 heads, J 21) at batch 32, bf16 logits: exactly the reference's routing."""
    logits, thresholds = make_logits(32, 505, seed=5, dtype=torch.bfloat16, ties=False)
    (heads, joined, scores, overflow), (heads_k, joined_k, scores_k, overflow_k) = both(logits, thresholds, 21)
    assert torch.equal(heads_k, heads) and torch.equal(joined_k, joined) and int(overflow_k) == int(overflow)
    torch.testing.assert_close(scores_k, scores, rtol=1e-2, atol=0)
