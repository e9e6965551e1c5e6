"""Packed documents: several documents laid end to end in one row of a batch, kept apart by every layer.

A packed batch is described per token by a document id ([B, T] integers, constant within a document and
non-decreasing along a row: documents are contiguous) or, in flash-attention's varlen convention, by `cu_seqlens`
(the cumulative document lengths of one flattened row). `document_layout` turns the ids into what the layers need
once per forward: where each token's document starts, its length, the token's offset in it and the RoPE position
of the token (the offset when positions restart per document, the default, else its place in the row; as
attention never leaves a document and RoPE scores depend on position differences only, the two agree up to
rounding, and restarting makes a packed document compute what it computes alone).

With a layout, every head kind keeps documents apart: attention never crosses a boundary, and MoSA heads route each
document on its own (k_d = max(2, len_d // sparsity) slots per head and document, `selection_sizes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from torch_mosa.checks import value_checks_allowed

# packed selections are widened to a multiple of this many slots (score-0 padding, at most 7 per row and head): a
# model compiled by torch.compile then meets few distinct widths, and each distinct width is a recompilation
SELECTION_WIDTH_MULTIPLE = 8


@dataclass(frozen=True, eq=False)
class DocumentLayout:
    """Per-token description of packed documents, all [B, T] int64 on the input's device.

    ids: document id (equal ids = same document); starts: row position of the token's document's first token;
    lengths: its document's length; offsets: position inside the document (0 at the first token);
    rope_positions: the position RoPE rotates the token by (offsets, or the row position without restart).
    """

    ids: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor
    rope_positions: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False)  # selection sizes and segments per (sparsity, k)

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    @property
    def is_first(self) -> torch.Tensor:
        """[B, T] bool: the token opens its document."""
        return self.offsets == 0

    def same_document(self) -> torch.Tensor:
        """[B, 1, T, T] bool: query t and key s are in one document and s <= t (the causal mask of a packed row)."""
        seq_len = self.ids.shape[1]
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=self.ids.device).tril()
        return (causal & (self.ids[:, :, None] == self.ids[:, None, :])).unsqueeze(1)

    def selection_sizes(self, sparsity: int | None, k: int | None) -> tuple[torch.Tensor, int]:
        """Per-token k_d [B, T] (the slots per head of the token's document: max(2, len_d // sparsity), or the
        fixed k, capped at len_d) and the selection width K: the largest sum of k_d over a row's documents, rounded
        up to a multiple of SELECTION_WIDTH_MULTIPLE (at most T).

        K is read to the host once per layout and (sparsity, k): the layers of one forward share it, and `prepare`
        reads it before a compiled forward."""
        key = (sparsity, k)
        if key not in self._cache:
            if k is not None:
                sizes = self.lengths.clamp(max=k)
            else:
                sizes = torch.minimum(self.lengths, (self.lengths // sparsity).clamp(min=2))
            per_row = torch.where(self.is_first, sizes, torch.zeros_like(sizes)).sum(-1)
            width = -(-int(per_row.max()) // SELECTION_WIDTH_MULTIPLE) * SELECTION_WIDTH_MULTIPLE
            self._cache[key] = sizes, min(width, self.shape[1])
        return self._cache[key]

    def prepare(self, selections) -> "DocumentLayout":
        """Read the selection sizes, width and segments of every (sparsity, k) in `selections` now, and return the
        layout. A forward compiled by torch.compile then finds them cached: the host reads they need would
        otherwise break its graph once per layer (and make a fullgraph compile fail)."""
        for sparsity, k in selections:
            self.selection_sizes(sparsity, k)
            self.selection_segments(sparsity, k)
        return self

    def selection_segments(self, sparsity: int | None, k: int | None) -> torch.Tensor:
        """[N, 5] int64 rows (b, start, length, k_d, slot offset), one per document of the batch in row-major order:
        where each document lies and where its k_d selection slots begin among its row's (see selection_sizes).
        Kept per (sparsity, k) like the sizes, so the layers of one forward share one host read."""
        key = ("segments", sparsity, k)
        if key not in self._cache:
            sizes, _ = self.selection_sizes(sparsity, k)
            rows, starts = self.is_first.nonzero(as_tuple=True)
            counts = sizes[rows, starts]
            before = counts.cumsum(0) - counts  # slots of every earlier document of the batch
            row_start = torch.zeros(self.shape[0], dtype=counts.dtype, device=counts.device).scatter_reduce(
                0, rows, before, reduce="amin", include_self=False)
            self._cache[key] = torch.stack([rows, starts, self.lengths[rows, starts], counts, before - row_start[rows]],
                                           dim=1)
        return self._cache[key]

    def document_count(self) -> torch.Tensor:
        """[B] number of documents in each row."""
        return self.is_first.sum(-1)

    def unpack(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """values [B, T, ...] -> (per-document rows [N, L, ...] right-padded with zeros, mask [N, L] bool), N the
        number of documents in the batch (row-major) and L the longest. Host sync: N and L are read."""
        batch, seq_len = self.ids.shape
        first = self.is_first.reshape(-1)
        document = first.long().cumsum(0) - 1  # [B*T] index of each token's document in the batch
        count, longest = int(first.sum()), int(self.lengths.max())
        flat_offsets = self.offsets.reshape(-1)
        rows = values.new_zeros((count, longest) + tuple(values.shape[2:]))
        rows[document, flat_offsets] = values.reshape((batch * seq_len,) + tuple(values.shape[2:]))
        mask = torch.zeros(count, longest, dtype=torch.bool, device=values.device)
        mask[document, flat_offsets] = True
        return rows, mask


def check_document_ids(document_ids: torch.Tensor, shape: tuple[int, int] | None = None) -> None:
    """document_ids: an integer [B, T] tensor, non-decreasing along each row (documents are contiguous)."""
    if not isinstance(document_ids, torch.Tensor) or document_ids.dim() != 2:
        got = tuple(document_ids.shape) if isinstance(document_ids, torch.Tensor) else type(document_ids).__name__
        raise ValueError(f"document_ids must be a [batch, seq_len] tensor, got {got}")
    if document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool or document_ids.is_complex():
        raise ValueError(f"document_ids must hold integers, got dtype {document_ids.dtype}")
    if shape is not None and tuple(document_ids.shape) != tuple(shape):
        raise ValueError(f"document_ids must have the input's shape {tuple(shape)}, got {tuple(document_ids.shape)}")
    if not value_checks_allowed():  # traced or captured: the host may not read the values
        return
    if document_ids.shape[1] > 1 and bool((document_ids[:, 1:] < document_ids[:, :-1]).any()):
        raise ValueError("document_ids must be non-decreasing along each row: a document's tokens are contiguous "
                         "and documents follow each other")


def document_layout(document_ids: torch.Tensor, restart_positions: bool = True) -> DocumentLayout:
    """The layout of packed documents given per-token ids [B, T] (see the module docstring). With
    `restart_positions` (the default) RoPE positions restart at 0 in every document, so a document sees the
    positions it would see alone; without it tokens keep their place in the row."""
    check_document_ids(document_ids)
    ids = document_ids.long()
    batch, seq_len = ids.shape
    position = torch.arange(seq_len, device=ids.device).expand(batch, -1)
    boundary = torch.ones_like(ids, dtype=torch.bool)
    boundary[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = torch.where(boundary, position, torch.zeros_like(position)).cummax(-1).values
    last = torch.ones_like(boundary)
    last[:, :-1] = boundary[:, 1:]
    ends = torch.where(last, position, torch.full_like(position, seq_len)).flip(-1).cummin(-1).values.flip(-1)
    offsets = position - starts
    return DocumentLayout(ids=ids, starts=starts, lengths=ends - starts + 1, offsets=offsets,
                          rope_positions=offsets if restart_positions else position.contiguous())


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    """flash-attention's varlen description -> document ids [1, T]: cu_seqlens [N + 1] int, starting at 0 and
    strictly increasing, the last entry the total length (which must equal `seq_len` when given)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.dtype.is_floating_point:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [num_documents + 1] starting at 0, got "
                         f"{cu_seqlens!r}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if int(cu_seqlens[0]) != 0 or bool((lengths <= 0).any()):
        raise ValueError(f"cu_seqlens must start at 0 and increase strictly, got {cu_seqlens.tolist()}")
    total = int(cu_seqlens[-1])
    if seq_len is not None and total != seq_len:
        raise ValueError(f"cu_seqlens ends at {total} but the flattened input has seq_len={seq_len} tokens")
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)[None]


def document_ids_from_separators(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """Document ids [B, T] of token windows cut from a stream of documents that each end with `separator_id`
    (the corpus pipeline's end-of-text token): a separator opens the next document, as a beginning-of-text token
    would, so each document after a window's first starts with it. The window's first tokens (often the tail of a
    document cut by the window) form document 0."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    return (input_ids == separator_id).long().cumsum(-1)


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document ids [B, T] from position ids that restart at 0 with every document, as transformers'
    DataCollatorWithFlattening packs examples: along a row each position is 0 (a document starts) or the previous
    position plus one. Any other pattern (e.g. positions derived from left padding) is refused."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.dtype.is_floating_point:
        got = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids must be an integer [batch, seq_len] tensor, got {got}")
    starts = position_ids[:, 1:] == 0
    if not bool((starts | (position_ids[:, 1:] == position_ids[:, :-1] + 1)).all()):
        raise ValueError("position_ids must count 0, 1, 2, ... within each packed document and restart at 0 where "
                         "the next document begins (transformers' DataCollatorWithFlattening format)")
    return torch.nn.functional.pad(starts.long(), (1, 0)).cumsum(-1)
