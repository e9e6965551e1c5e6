"""Expert-choice top-k routing: `topk_route` dispatches to the reference or the selection kernel."""

from __future__ import annotations

import torch

from torch_mosa.ops.dispatch import use_fast_path
from torch_mosa.ops.selection.reference import topk_route_documents_reference, topk_route_reference


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, T, h], router weight [E, h] -> logits [B, E, T] in float32 (float64 for float64 x), no gradient.

    Routing ranks these logits, so they are kept in float32 even under autocast (16-bit operands, float32
    accumulation and output): a selection must not flip with the dtype the logits are stored in. One
    [E, h] x [h, B*T] product puts the odd head count E on the product's rows, where it costs nothing: 0.06 ms in
    SPEC §6 case A against 0.39 ms for x @ weight.T (H100, 2026-11-23).
    """
    batch, seq_len, hidden = x.shape
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        columns = x.reshape(batch * seq_len, hidden).t()
        weight = weight.to(x.dtype)
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            logits = torch.mm(weight, columns, out_dtype=torch.float32)
        else:
            accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
            logits = torch.mm(weight.to(accumulate), columns.to(accumulate))
    return logits.view(-1, batch, seq_len).transpose(0, 1)


def topk_route(logits: torch.Tensor, k: int, include_first: bool = False, attention_mask=None):
    """Each head's k highest-scoring tokens of each sequence (SPEC §1 step 2), as the MoSA op wants them.

    logits [B, E, T] router logits (no gradient is taken through them); k <= T; attention_mask [B, T] (1 = real)
    or None. Returns indices [B, E, k] int64 (real positions ascending, then the padding slots a row with fewer
    than k real tokens needs) and scores [B, E, k] float32 (float64 for float64 logits): sigmoid of the chosen
    logits, 0 for padding slots. Ties go to the lowest position.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, E, T], got shape {tuple(logits.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be an integer in [1, T={logits.shape[-1]}], got k={k!r}")
    if use_fast_path(logits):
        from torch_mosa.ops.selection.triton_selection import topk_route_triton

        return topk_route_triton(logits, k, include_first, attention_mask)
    return topk_route_reference(logits, k, include_first, attention_mask)


def topk_route_documents(logits: torch.Tensor, layout, sparsity: int | None, k: int | None,
                         include_first: bool = False):
    """`topk_route` for packed documents: each document of a row routes on its own, with
    k_d = max(2, len_d // sparsity) slots per head (or the fixed k, capped at len_d) and include_first forcing the
    document's first token. logits [B, E, T], layout a DocumentLayout (ops/documents.py) -> indices, scores
    [B, E, K], K the largest sum of k_d over a row (padding slots, position 0 and score 0, fill shorter rows).

    On CUDA one program of the selection kernel per (document, head); elsewhere two stable sorts in PyTorch.
    """
    if logits.dim() != 3 or tuple(logits.shape[::2]) != tuple(layout.shape):
        raise ValueError(f"logits must be [B, E, T] with [B, T] = {tuple(layout.shape)}, got {tuple(logits.shape)}")
    sizes, width = layout.selection_sizes(sparsity, k)
    if use_fast_path(logits):
        from torch_mosa.ops.selection.triton_selection import topk_route_segments_triton

        return topk_route_segments_triton(logits, layout.selection_segments(sparsity, k), width, include_first)
    return topk_route_documents_reference(logits, sizes, width, include_first, layout)

