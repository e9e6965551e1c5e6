"""Argument checks shared by every attention layer, so bad input fails with the same clear messages."""

from __future__ import annotations

import dataclasses

import torch


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return value


def dataclass_from_dict(cls, values: dict):
    """cls(**values), refusing names that are not fields of the dataclass (a typo in a saved config)."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**values)


def check_attention_input(x: torch.Tensor, hidden_size: int, weight: torch.Tensor, attention_mask) -> None:
    """x must be [B, T, hidden_size] on weight's device and dtype; attention_mask [B, T] of bools/ints, 1 = real."""
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


def selection_size(seq_len: int, sparsity: int | None, k: int | None) -> int:
    """k = max(2, seq_len // sparsity) capped at seq_len, or the fixed k (which must not exceed seq_len)."""
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
