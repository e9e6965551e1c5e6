"""Packed-document layouts (ops/documents.py): per-token starts, lengths, offsets and positions, the varlen and
separator descriptions, unpacking to per-document rows, and clear errors."""

import pytest
import torch

from torch_mosa.ops.documents import (document_ids_from_cu_seqlens, document_ids_from_position_ids,
                                      document_ids_from_separators, document_layout)


def test_layout_of_documents_of_odd_lengths():
    ids = torch.tensor([[3, 4, 4, 7, 7, 7], [0, 0, 0, 0, 0, 0]])
    layout = document_layout(ids)
    assert layout.starts.tolist() == [[0, 1, 1, 3, 3, 3], [0] * 6]
    assert layout.lengths.tolist() == [[1, 2, 2, 3, 3, 3], [6] * 6]
    assert layout.offsets.tolist() == [[0, 0, 1, 0, 1, 2], list(range(6))]
    assert layout.rope_positions.tolist() == layout.offsets.tolist()
    assert document_layout(ids, restart_positions=False).rope_positions.tolist() == [list(range(6))] * 2
    assert layout.document_count().tolist() == [3, 1]
    allowed = layout.same_document()[0, 0]
    assert allowed[2].tolist() == [False, True, True, False, False, False]
    assert allowed[5].tolist() == [False, False, False, True, True, True]


def test_selection_sizes_per_document():
    layout = document_layout(torch.tensor([[0] * 1 + [1] * 2 + [2] * 9 + [3] * 20]))
    sizes, width = layout.selection_sizes(4, None)  # k_d = min(len, max(2, len // 4)): 1, 2, 2, 5
    assert sizes[0, [0, 1, 3, 12]].tolist() == [1, 2, 2, 5] and width == 16  # 10 slots, widened to a multiple of 8
    sizes, width = layout.selection_sizes(None, 3)  # fixed k, capped at the document's length
    assert sizes[0, [0, 1, 3, 12]].tolist() == [1, 2, 3, 3] and width == 16  # 9 slots


def test_unpack_to_document_rows():
    layout = document_layout(torch.tensor([[0, 1, 1, 1], [5, 5, 6, 6]]))
    values = torch.arange(8.0).view(2, 4, 1)
    rows, mask = layout.unpack(values)
    assert rows[..., 0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 0], [6, 7, 0]]
    assert mask.tolist() == [[True, False, False], [True, True, True], [True, True, False], [True, True, False]]


def test_position_ids_of_flattened_packing():
    assert document_ids_from_position_ids(torch.tensor([[0, 1, 2, 0, 0, 1], [5, 6, 0, 1, 2, 3]])).tolist() == \
        [[0, 0, 0, 1, 2, 2], [0, 0, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="restart at 0"):
        document_ids_from_position_ids(torch.tensor([[1, 1, 1, 0, 1]]))  # positions of a left-padded row


def test_cu_seqlens_and_separators():
    assert document_ids_from_cu_seqlens(torch.tensor([0, 1, 3, 6])).tolist() == [[0, 1, 1, 2, 2, 2]]
    # a separator (end of text) opens the next document, like a beginning-of-text token
    tokens = torch.tensor([[5, 9, 0, 4, 4, 0, 0, 7]])
    assert document_ids_from_separators(tokens, 0).tolist() == [[0, 0, 1, 1, 1, 2, 3, 3]]


@pytest.mark.parametrize("make, match", [
    (lambda: document_layout(torch.tensor([[0, 1, 0]])), "non-decreasing"),
    (lambda: document_layout(torch.zeros(4, dtype=torch.long)), r"\[batch, seq_len\]"),
    (lambda: document_layout(torch.zeros(1, 4)), "integers"),
    (lambda: document_ids_from_cu_seqlens(torch.tensor([1, 3])), "start at 0"),
    (lambda: document_ids_from_cu_seqlens(torch.tensor([0, 2, 2])), "increase strictly"),
    (lambda: document_ids_from_cu_seqlens(torch.tensor([0, 2, 5]), seq_len=4), "seq_len=4"),
])
def test_errors_name_the_problem(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_selection_segments():
    layout = document_layout(torch.tensor([[0] * 1 + [1] * 2 + [2] * 9 + [3] * 20, [7] * 32]))
    segments = layout.selection_segments(4, None)
    # (row, start, length, k_d, slot offset): k_d = 1, 2, 2, 5 in row 0 (offsets 0, 1, 3, 5), 8 in row 1
    assert segments.tolist() == [[0, 0, 1, 1, 0], [0, 1, 2, 2, 1], [0, 3, 9, 2, 3], [0, 12, 20, 5, 5],
                                 [1, 0, 32, 8, 0]]
    assert layout.selection_segments(4, None) is segments  # kept for the other layers of the forward
