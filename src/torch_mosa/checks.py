"""Argument checks shared by every attention layer, so bad input fails with the same clear messages."""

from __future__ import annotations

import dataclasses

import torch


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return value


def check_head_sizes(hidden_size, num_heads, head_dim) -> None:
    """The three sizes every attention layer is built from, each a positive integer."""
    check_positive_int("hidden_size", hidden_size)
    check_positive_int("num_heads", num_heads)
    check_positive_int("head_dim", head_dim)


def dataclass_from_dict(cls, values: dict):
    """cls(**values), refusing names that are not fields of the dataclass (a typo in a saved config)."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**values)


def check_attention_input(x: torch.Tensor, hidden_size: int, weight: torch.Tensor, attention_mask,
                          documents=None) -> None:
    """x must be [B, T, hidden_size] on weight's device and dtype; attention_mask [B, T] of bools/ints, 1 = real;
    documents (a DocumentLayout of packed documents) of shape [B, T], and not together with an attention_mask."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [batch, seq_len, hidden_size], got rank {x.dim()} shape {tuple(x.shape)}")
    if x.shape[-1] != hidden_size:
        raise ValueError(f"x.shape[-1] must equal hidden_size={hidden_size}, got {x.shape[-1]}")
    if x.shape[1] < 1:
        raise ValueError("x must hold at least one token (seq_len >= 1)")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the layer's parameters are on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x has dtype {x.dtype} but the layer's parameters have dtype {weight.dtype}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != x.shape[:2]:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask must be a [batch, seq_len]={tuple(x.shape[:2])} tensor, got {shape}")
        if attention_mask.device != x.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but x is on {x.device}")
        if attention_mask.is_floating_point():
            raise TypeError(f"attention_mask must be bool or integer (1 = real token), got dtype {attention_mask.dtype}")
    if documents is not None:
        if tuple(documents.shape) != tuple(x.shape[:2]):
            raise ValueError(f"documents describe shape {tuple(documents.shape)} but x has [batch, seq_len]="
                             f"{tuple(x.shape[:2])}")
        if documents.ids.device != x.device:
            raise ValueError(f"documents are on {documents.ids.device} but x is on {x.device}")
        if attention_mask is not None:
            raise ValueError("pass either attention_mask (padded rows) or documents (packed rows), not both: "
                             "packed rows hold no padding")


def selection_size(seq_len: int, sparsity: int | None, k: int | None) -> int:
    """Tokens per sparse head, the one definition that every layer and the FLOP accounting use (SPEC §1):
    k = max(2, seq_len // sparsity) capped at seq_len, or the fixed k (which must not exceed seq_len)."""
    if k is not None:
        if k > seq_len:
            raise ValueError(f"k={k} exceeds the sequence length seq_len={seq_len}; use k <= seq_len or a sparsity")
        return k
    return min(seq_len, max(2, seq_len // sparsity))


ROUTING_MODES = ("topk", "causal")


def check_routing(routing: str) -> str:
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
    return routing


def first_real_position(attention_mask, batch: int, device) -> torch.Tensor:
    """[B] position of each row's first real token (0 without a mask): what include_first forces in."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return attention_mask.bool().long().argmax(dim=1)


def resolve_device(device: str | torch.device) -> torch.device:
    """A usable torch.device from 'auto' (CUDA when present, else the CPU), 'cpu', 'cuda' or 'cuda:N'; a device
    that does not exist here is an error naming it and what is available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={str(device)!r} but CUDA is not available here: use 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device={str(device)!r} but only {count} CUDA device(s) exist (cuda:0 to "
                             f"cuda:{count - 1})")
    elif resolved.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return resolved


def value_checks_allowed() -> bool:
    """False while torch.compile traces or a CUDA graph is being captured. A check of tensor values needs the host
    to read them: under tracing the data-dependent branch would break the graph (and sync the GPU every step), and
    inside a capture the read is an illegal synchronisation that invalidates the graph. Compiled or graphed code
    meets bad values in the kernels instead (an embedding index out of range is a device-side error)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """Every id in [0, vocab_size), else an error naming the first bad id and where it is. Skipped where the host
    may not read the values (`value_checks_allowed`)."""
    if not value_checks_allowed():
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = tuple(i.item() for i in bad.nonzero()[0])
        raise ValueError(f"{name} holds id {ids[where].item()} at index {where}; allowed 0..{vocab_size - 1} "
                         f"(vocab_size={vocab_size})")
