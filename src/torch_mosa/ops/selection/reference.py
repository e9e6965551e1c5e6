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
