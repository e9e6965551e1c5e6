"""MoSA head op: `mosa_attention` dispatches to the reference or the fast kernels (see ops/dispatch.py)."""

from __future__ import annotations

import torch

from torch_mosa.ops.dispatch import use_fast_path
from torch_mosa.ops.mosa.reference import check_mosa_inputs, mosa_attention_reference, weight_dtypes_for

__all__ = ["mosa_attention", "mosa_attention_reference", "weight_dtypes_for"]


def mosa_attention(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    w_o: torch.Tensor,
    indices: torch.Tensor,
    scores: torch.Tensor,
    *,
    rotary_dim: int,
    rope_base: float,
    router_weight: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over heads of MoSA head outputs, scattered back to [B, T, h].

    x [B, T, h]; w_qkv [E, h, 3*d]; w_o [E, d, h] (in x's dtype, or float32 for 16-bit x: read in x's dtype,
    their gradients returned in float32); indices [B, E, k] positions in slot order (slot i attends to
    slots <= i); scores [B, E, k] router scores of the selected tokens (0 for unused slots, which go last).
    router_weight [E, h] or None: when given, scores must be sigmoid(x[position] . router_weight[e]) (detached) and
    the router's gradient (to router_weight and x) is computed inside the op, from the selected rows only.
    Packed documents (ops/documents.py): positions [B, T] integers in [0, T), the position RoPE rotates each token
    by (default: its index); document_ids [B, T]: a slot attends only to earlier slots of its own document.
    Bitwise reproducible on a GPU under torch.use_deterministic_algorithms(True): the kernels then write one output
    row per selected slot and sum them into tokens in a fixed order, instead of adding with fp32 atomics.
    """
    check_mosa_inputs(x, w_qkv, w_o, indices, scores, rotary_dim, router_weight, positions, document_ids)
    # the kernels sum heads with fp32 atomics (run-to-run differences ~1e-3); under
    # torch.use_deterministic_algorithms(True) they write per-slot rows that a token-major segmented sum adds up in
    # slot order
    if use_fast_path(x):
        from torch_mosa.ops.mosa.triton_mosa import fused_mosa_attention

        return fused_mosa_attention(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base, router_weight,
                                    positions, document_ids, torch.are_deterministic_algorithms_enabled())
    return mosa_attention_reference(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base,
                                    router_weight=router_weight, positions=positions, document_ids=document_ids)
