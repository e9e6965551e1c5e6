"""Expert-choice top-k selection: the reference's contract, and the radix-select kernel against it.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import pytest
import torch

from torch_mosa.ops.selection import router_logits, topk_route
from torch_mosa.ops.selection.reference import topk_route_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_logits(batch, heads, seq_len, seed, ties=False):
    logits = torch.randn(batch, heads, seq_len, generator=torch.Generator().manual_seed(seed))
    if ties:  # every 5th logit copies one value, so rows hold many exact ties around their k-th value
        logits[..., ::5] = logits[..., 2:3]
    return logits


def test_reference_contract():
    logits = make_logits(2, 3, 12, seed=0)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :10] = False  # two real tokens, k = 4: two padding slots
    indices, scores = topk_route_reference(logits, 4, include_first=True, attention_mask=mask)
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    assert (indices[0].diff(dim=-1) > 0).all() and (indices[0, :, 0] == 0).all()
    assert indices[1, :, :2].tolist() == [[10, 11]] * 3 and (scores[1, :, 2:] == 0).all()
    assert indices[1, :, 2:].tolist() == [[0, 1]] * 3  # padding slots: lowest padded positions, ascending
    torch.testing.assert_close(scores[0], torch.sigmoid(logits[0].gather(-1, indices[0])))
    top = logits[0, :, 1:].topk(3, dim=-1).indices + 1
    assert torch.equal(indices[0, :, 1:], top.sort(dim=-1).values)


def test_reference_ties_go_to_lowest_position():
    logits = torch.zeros(1, 1, 10)
    logits[0, 0, 7] = 1.0
    indices, _ = topk_route_reference(logits, 3, include_first=False)
    assert indices.tolist() == [[[0, 1, 7]]]


def test_reference_accepts_strided_logits():
    """The router's [E, B*T] product viewed as [B, E, T] selects as its contiguous copy does."""
    x, weight = torch.randn(3, 11, 8), torch.randn(5, 8)
    logits = router_logits(x, weight)
    assert logits.shape == (3, 5, 11) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, torch.einsum("eh,bth->bet", weight, x))
    for a, b in zip(topk_route(logits, 3, True), topk_route(logits.contiguous(), 3, True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("include_first", [False, True])
@pytest.mark.parametrize("sparsity, k", [(4, None), (None, 3)])
def test_per_document_selection_is_each_document_alone(include_first, sparsity, k):
    """Packed rows of documents of lengths 1, 2, 9, 13 and 25 (rows of unequal slot totals): each document takes
    what top-k over it alone takes, at its own k_d, then padding slots fill the row to the batch's width."""
    from torch_mosa.ops.documents import document_layout
    from torch_mosa.ops.selection import topk_route_documents

    lengths = [[1, 2, 9, 13], [25]]
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    layout = document_layout(ids)
    logits = torch.randn(2, 3, 25, generator=torch.Generator().manual_seed(4)).round(decimals=1)  # ties too
    indices, scores = topk_route_documents(logits, layout, sparsity, k, include_first)
    assert indices.shape[-1] == layout.selection_sizes(sparsity, k)[1]
    for b, row in enumerate(lengths):
        start, alone_indices, alone_scores = 0, [], []
        for length in row:
            k_d = min(length, k) if k is not None else min(length, max(2, length // sparsity))
            i, sc = topk_route(logits[b:b + 1, :, start:start + length], k_d, include_first)
            alone_indices.append(i + start)
            alone_scores.append(sc)
            start += length
        alone_indices, alone_scores = torch.cat(alone_indices, -1), torch.cat(alone_scores, -1)
        n = alone_indices.shape[-1]
        assert torch.equal(indices[b:b + 1, :, :n], alone_indices)
        torch.testing.assert_close(scores[b:b + 1, :, :n], alone_scores, rtol=0, atol=1e-7)
        assert (scores[b, :, n:] == 0).all()


def test_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        topk_route(torch.randn(1, 2, 5), 6)


triton = pytest.importorskip("triton")
from torch_mosa.ops.selection import triton_selection  # noqa: E402
from torch_mosa.ops.selection.triton_selection import topk_route_triton  # noqa: E402

KERNEL_CASES = [
    # batch, heads, seq_len, k, include_first, padded, ties
    pytest.param(2, 3, 37, 5, True, True, True, id="T37-k5-padded-ties"),
    pytest.param(1, 2, 100, 50, False, False, False, id="T100-k50"),
    pytest.param(3, 4, 64, 64, True, True, True, id="k=T-all-padding-row"),
    pytest.param(2, 2, 9000, 70, True, True, True, id="T9000-three-chunks"),
    pytest.param(2, 3, 20, 2, False, True, False, id="k2-padded"),
    pytest.param(1, 5, 33, 3, True, False, True, id="T33-include_first-ties"),
    pytest.param(2, 3, 1024, 16, True, True, True, id="T1024-k16-padded-ties"),
    pytest.param(1, 3, 300, 100, False, True, True, id="T300-k100-padded-ties"),
    pytest.param(2, 2, 17, 1, True, False, False, id="k1-include_first"),
]


@pytest.mark.parametrize("by_sort", [False, True], ids=["search", "sort"])
@pytest.mark.parametrize("batch,heads,seq_len,k,include_first,padded,ties", KERNEL_CASES)
def test_kernel_matches_reference(monkeypatch, batch, heads, seq_len, k, include_first, padded, ties, by_sort):
    """The kernel's bitwise search and its sort (`SELECT_BY_SORT`, rows of one chunk) against the reference."""
    monkeypatch.setattr(triton_selection, "SELECT_BY_SORT", by_sort)
    logits = make_logits(batch, heads, seq_len, seed=seq_len + k, ties=ties).to(DEVICE)
    mask = None
    if padded:
        mask = torch.ones(batch, seq_len, dtype=torch.bool, device=DEVICE)
        mask[0, : seq_len // 2 + 3] = False
        if batch > 2:
            mask[2] = False
    expected = topk_route_reference(logits, k, include_first, mask)
    actual = topk_route_triton(logits, k, include_first, mask)
    assert torch.equal(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-6, atol=1e-7)


def test_kernel_reads_strided_logits():
    x, weight = torch.randn(2, 40, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    logits = router_logits(x, weight)
    assert not logits.is_contiguous()
    for a, b in zip(topk_route_triton(logits, 6, True), topk_route_reference(logits, 6, True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_kernel_is_a_custom_op_for_torch_compile():
    from torch_mosa.ops.selection.triton_selection import _topk_route_op

    logits = make_logits(2, 3, 40, seed=1).to(DEVICE)
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    mask[0, :5] = False
    for args in ((logits, 6, True, mask), (logits, 6, False, None)):
        torch.library.opcheck(_topk_route_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("lengths, sparsity, k", [
    pytest.param([[1, 2, 9, 13], [25], [3, 5, 17]], 4, None, id="docs-1-2-9-13"),
    pytest.param([[1, 2, 63, 65, 781], [912]], 8, None, id="docs-1-2-63-65-781"),
    pytest.param([[5000, 4000], [9000]], 64, None, id="three-chunk-documents"),
    pytest.param([[7, 1, 17], [2, 2, 21]], None, 3, id="fixed-k"),
])
@pytest.mark.parametrize("include_first", [False, True])
def test_segment_kernel_matches_per_document_reference(lengths, sparsity, k, include_first):
    """The packed-batch kernel (one program per document and head) equals the per-document reference, ties and
    padding slots included."""
    from torch_mosa.ops.documents import document_layout
    from torch_mosa.ops.selection.reference import topk_route_documents_reference
    from torch_mosa.ops.selection.triton_selection import topk_route_segments_triton

    ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]).to(DEVICE)
    layout = document_layout(ids)
    sizes, width = layout.selection_sizes(sparsity, k)
    logits = make_logits(len(lengths), 3, ids.shape[1], seed=ids.shape[1], ties=True).to(DEVICE)
    expected = topk_route_documents_reference(logits, sizes, width, include_first, layout)
    actual = topk_route_segments_triton(logits, layout.selection_segments(sparsity, k), width, include_first)
    assert torch.equal(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-6, atol=1e-7)


def test_segment_kernel_is_a_custom_op_for_torch_compile():
    from torch_mosa.ops.documents import document_layout
    from torch_mosa.ops.selection.triton_selection import _topk_segments_op

    layout = document_layout(torch.tensor([[0] * 7 + [1] * 33], device=DEVICE))
    _, width = layout.selection_sizes(4, None)
    logits = make_logits(1, 3, 40, seed=2).to(DEVICE)
    torch.library.opcheck(_topk_segments_op, (logits, layout.selection_segments(4, None), width, True),
                          test_utils=("test_schema", "test_faketensor"))
