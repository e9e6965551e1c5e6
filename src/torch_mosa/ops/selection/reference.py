"""Plain-PyTorch expert-choice top-k selection: the CPU path and the oracle of the selection kernel."""

from __future__ import annotations

import torch

from torch_mosa.checks import first_real_position


def topk_route_reference(logits: torch.Tensor, k: int, include_first: bool, attention_mask=None):
    """logits [B, E, T] -> indices [B, E, k] int64, scores [B, E, k] float32 (no gradient).

    Each (b, e) row takes its k largest logits; ties go to the lowest position (a stable descending sort), so the
    choice is deterministic. include_first forces each row's first real token in; padded positions (attention_mask
    0) are never chosen while real ones are left. Slots hold the chosen real positions in ascending order, then the
    padding slots a short row needs (ascending too); scores are sigmoid(logit) for real slots and 0 for padding.
    """
    batch, _, seq_len = logits.shape
    logits = logits.detach().float() if logits.dtype != torch.float64 else logits.detach()
    priority = logits
    valid = None
    if attention_mask is not None:
        valid = attention_mask.bool().unsqueeze(1).expand_as(priority)
        priority = priority.masked_fill(~valid, float("-inf"))
    if include_first:
        first = first_real_position(attention_mask, batch, logits.device)
        priority = priority.scatter(-1, first.view(batch, 1, 1).expand(-1, priority.shape[1], 1), float("inf"))
    chosen = priority.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    chosen_valid = torch.ones_like(chosen, dtype=torch.bool) if valid is None else valid.gather(-1, chosen)
    indices, real, _ = sort_selection(chosen, chosen_valid, seq_len)
    scores = torch.sigmoid(logits.gather(-1, indices)).masked_fill(~real, 0.0)
    return indices, scores.float() if scores.dtype != torch.float64 else scores


def sort_selection(indices: torch.Tensor, valid: torch.Tensor, seq_len: int):
    """Order each head's selection by position, with invalid slots last.

    indices, valid [..., k] -> (sorted indices, sorted valid, permutation). Invalid slots (padding) go last so
    that under the slot-causal mask no real token ever attends to them.
    """
    sort_key = indices + seq_len * (~valid).long()
    sorted_key, order = sort_key.sort(dim=-1)
    return sorted_key.remainder(seq_len), sorted_key < seq_len, order


def topk_route_documents_reference(logits: torch.Tensor, sizes: torch.Tensor, width: int, include_first: bool,
                                   layout):
    """Per-document top-k: logits [B, E, T], sizes [B, T] (each token's document's k_d), width K (the largest sum
    of k_d over a row), layout a DocumentLayout -> indices [B, E, K] int64, scores [B, E, K] float32.

    Each document of each row takes, per head, its k_d largest logits (ties to the lowest position;
    include_first forces the document's first token in), exactly as top-k over that document alone would. Slots
    hold every document's choices in ascending position, then padding slots (position 0, score 0) up to K for rows
    whose documents sum to fewer slots.

    Two stable sorts rank tokens within their document without a loop over documents: descending by logit, then
    by document; a token's rank is then its place in the sorted row less its document's start.
    """
    batch, num_heads, seq_len = logits.shape
    logits = logits.detach().float() if logits.dtype != torch.float64 else logits.detach()
    priority = logits
    if include_first:
        priority = priority.masked_fill(layout.is_first[:, None, :], float("inf"))
    by_logit = priority.sort(dim=-1, descending=True, stable=True).indices  # [B, E, T]
    ids = layout.ids[:, None, :].expand(-1, num_heads, -1)
    by_document = ids.gather(-1, by_logit).sort(dim=-1, stable=True).indices
    order = by_logit.gather(-1, by_document)  # grouped by document, each by descending logit
    rank = torch.arange(seq_len, device=logits.device) - layout.starts[:, None, :].expand_as(order).gather(-1, order)
    chosen_sorted = rank < sizes[:, None, :].expand_as(order).gather(-1, order)
    chosen = torch.zeros_like(chosen_sorted).scatter(-1, order, chosen_sorted)  # [B, E, T] membership
    positions = torch.arange(seq_len, device=logits.device).expand(batch, num_heads, -1)
    indices, real, _ = sort_selection(positions, chosen, seq_len)
    indices, real = indices[..., :width], real[..., :width]
    scores = torch.sigmoid(logits.gather(-1, indices)).masked_fill(~real, 0.0)
    return indices.masked_fill(~real, 0), scores.float() if scores.dtype != torch.float64 else scores
