"""One decode step over KV caches: `route_heads` (a new token's causal routing to at most J sparse heads),
`sparse_decode` (the step of sparse heads, MoSA or fixed, over the heads a token joined) and `layer_decode` (a whole
layer's dense and MoSA heads in one step) each dispatch to the reference or the fused kernels (see
ops/dispatch.py)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from torch_mosa.ops.decode.reference import (largest_margin_heads, layer_decode_reference, route_heads_reference,
                                             sparse_decode_reference)
from torch_mosa.ops.dispatch import use_fast_path

__all__ = ["DenseDecodeInputs", "MoSADecodeInputs", "layer_decode", "largest_margin_heads", "route_heads",
           "sparse_decode", "LAYER_DECODE_MAX_MOSA_HEADS", "layer_decode_arguments",
           "layer_decode_suits"]

# The fused layer step routes each row inside its MoSA programs, every program computing all E router logits: cheap
# for a few dozen heads (the 4 + 17 model), not for the IsoFLOP model's hundreds, which keep route_heads +
# sparse_decode
LAYER_DECODE_MAX_MOSA_HEADS = 64


class DenseDecodeInputs(NamedTuple):
    """A layer's dense heads for `layer_decode`: qkv [B, H*3d] (the new token's W_QKV projection, per head Q|K|V),
    w_o [h, H*d] (nn.Linear's weight), the cache's k, v [B, H, max_len, d] by position and key_real [B, max_len]
    (real tokens), mark_real: this layer marks the new position real (layers sharing key_real: the first)."""

    qkv: torch.Tensor
    w_o: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_real: torch.Tensor
    mark_real: bool


class MoSADecodeInputs(NamedTuple):
    """A layer's MoSA heads for `layer_decode`: router_weight [E, h], thresholds [E] (causal routing, SPEC §5),
    heads_per_token (None: no limit), w_qkv [E, h, 3d], w_o [E, d, h] in x's dtype, and the SparseCache's k, v
    [B, E, capacity + 1, d], counts [B, E], capacity_overflow and token_overflow (0-dim long counters)."""

    router_weight: torch.Tensor
    thresholds: torch.Tensor
    heads_per_token: int | None
    w_qkv: torch.Tensor
    w_o: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    counts: torch.Tensor
    capacity_overflow: torch.Tensor
    token_overflow: torch.Tensor


def route_heads(logits: torch.Tensor, thresholds: torch.Tensor, token_overflow: torch.Tensor, heads_per_token: int):
    """A new token's causal routing (SPEC §5) to at most J = heads_per_token heads.

    logits [B, E] the token's router logits, thresholds [E]; token_overflow a 0-dim long counter, incremented in
    place by the joins beyond J. Returns heads [B, J] long (the J heads of largest margin logit - threshold, in the
    order of `largest_margin_heads`), joined [B, J] bool (that head's logit passes its threshold) and scores [B, J]
    (sigmoid of the logit, in the logits' dtype). On CUDA one kernel instead of a sort, gathers and a reduction.
    """
    if not 0 < heads_per_token <= logits.shape[-1]:
        raise ValueError(f"heads_per_token must be in 1..{logits.shape[-1]} (the number of heads), "
                         f"got {heads_per_token}")
    if use_fast_path(logits):
        from torch_mosa.ops.decode.triton_decode import route_heads_triton

        return route_heads_triton(logits.contiguous(), thresholds.contiguous(), token_overflow, int(heads_per_token))
    return route_heads_reference(logits, thresholds, token_overflow, heads_per_token)


def sparse_decode(x: torch.Tensor, heads: torch.Tensor | None, joined: torch.Tensor, scores: torch.Tensor,
                  position: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor, cache_k: torch.Tensor,
                  cache_v: torch.Tensor, counts: torch.Tensor, capacity_overflow: torch.Tensor, *, rotary_dim: int,
                  rope_base: float) -> torch.Tensor:
    """One new token per row through the sparse heads it joined -> out [B, h] (the heads' summed output).

    x [B, h] the token's input; heads [B, J] the head of each of J slots (None: all E heads in order); joined
    [B, J] bool, the token joins that head; scores [B, J] its router scores (1 for fixed heads); position [1] long,
    the token's position (a tensor: no host sync, CUDA-graph safe); w_qkv [E, h, 3d], w_o [E, d, h] in x's dtype.
    The cache, updated in place: cache_k, cache_v [B, E, capacity + 1, d], counts [B, E] tokens each head holds,
    capacity_overflow a 0-dim long counter. A joined head with room appends its K, V (rotated at `position`) and
    the token attends over the head's held tokens; a join into a full head is counted in capacity_overflow and
    adds nothing. The last cache slot is scratch (never attended).
    """
    if use_fast_path(x):
        from torch_mosa.ops.decode.triton_decode import sparse_decode_triton

        return sparse_decode_triton(x.contiguous(), None if heads is None else heads.contiguous(),
                                    joined.contiguous(), scores.contiguous(), position, w_qkv.contiguous(),
                                    w_o.contiguous(), cache_k, cache_v, counts, capacity_overflow, int(rotary_dim),
                                    float(rope_base))
    return sparse_decode_reference(x, heads, joined, scores, position, w_qkv, w_o, cache_k, cache_v, counts,
                                   capacity_overflow, rotary_dim, rope_base)


def layer_decode(x: torch.Tensor, position: torch.Tensor, dense: DenseDecodeInputs | None,
                 mosa: MoSADecodeInputs | None, *, rotary_dim: int, rope_base: float) -> torch.Tensor:
    """One new token per row through a layer's dense heads and MoSA heads -> out [B, h], their summed output (in the
    dense Q|K|V's dtype when there are dense heads, else x's).

    x [B, h] the token's input (in the MoSA weights' dtype), position [1] long. Either part may be None; both use
    head_dim d and RoPE on the first `rotary_dim` dims. The caches are updated in place as DenseAttention's and
    MoSAAttention's decode steps update them, and the MoSA heads route the token as MoSAAttention.route_token does.
    On CUDA one kernel runs every head (dense heads: rotate, append, attend over the real positions; MoSA heads:
    route, then project, append and attend for the heads joined) and one more sums them through W_O: two launches
    per layer after the dense W_QKV GEMM, where the separate steps take about ten.
    """
    args = layer_decode_arguments(x, position, dense, mosa, rotary_dim, rope_base)
    if use_fast_path(x):
        from torch_mosa.ops.decode.triton_decode import layer_decode_triton

        return layer_decode_triton(*(t.contiguous() if isinstance(t, torch.Tensor) else t for t in args))
    return layer_decode_reference(*args)


def layer_decode_suits(batch: int, num_heads: int, heads_per_token: int | None) -> bool:
    """Whether a layer of `num_heads` MoSA heads decodes through layer_decode's fused step on the GPU: few enough heads
    for each MoSA program to route its row inside the kernel (LAYER_DECODE_MAX_MOSA_HEADS); any batch, since its
    MoSA programs (one per row and head slot) project only the heads a token joined. Needs Triton."""
    return num_heads <= LAYER_DECODE_MAX_MOSA_HEADS


def layer_decode_arguments(x, position, dense: DenseDecodeInputs | None, mosa: MoSADecodeInputs | None,
                           rotary_dim: int, rope_base: float) -> tuple:
    """The flat, checked arguments of layer_decode's implementations (an absent part's tensors None, the head limit
    an int: E when there is none)."""
    if dense is None and mosa is None:
        raise ValueError("layer_decode needs dense heads, MoSA heads or both; got neither")
    _check_layer_decode_shapes(x, position, dense, mosa, rotary_dim)
    num_heads = 0 if mosa is None else mosa.router_weight.shape[0]
    limit = num_heads if mosa is None or mosa.heads_per_token is None else mosa.heads_per_token
    if mosa is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"heads_per_token must be a positive integer or None, got {mosa.heads_per_token!r}")
    dense_args = (None,) * 5 + (False,) if dense is None else tuple(dense)
    mosa_args = (None,) * 9 if mosa is None else (mosa.router_weight, mosa.thresholds) + tuple(mosa)[3:]
    return (x, position, *dense_args, *mosa_args, min(limit, num_heads), int(rotary_dim), float(rope_base))


def _check_layer_decode_shapes(x, position, dense, mosa, rotary_dim) -> None:
    """Shapes layer_decode's kernels rely on (they index raw pointers): a clear error naming the argument instead."""
    def expect(name, tensor, shape):
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"layer_decode: {name} must have shape {list(shape)}, got {list(tensor.shape)}")

    if x.dim() != 2:
        raise ValueError(f"layer_decode: x must be [batch, hidden], got shape {list(x.shape)}")
    batch, hidden = x.shape
    if position.numel() != 1 or position.dtype != torch.long:
        raise ValueError(f"layer_decode: position must be a one-element long tensor, got shape {list(position.shape)} "
                         f"and dtype {position.dtype}")
    head_dims = set()
    if dense is not None:
        if dense.k.dim() != 4:
            raise ValueError(f"layer_decode: dense.k must be [batch, heads, max_len, head_dim], got {list(dense.k.shape)}")
        _, heads, max_len, head_dim = dense.k.shape
        head_dims.add(head_dim)
        expect("dense.k", dense.k, (batch, heads, max_len, head_dim))
        expect("dense.v", dense.v, dense.k.shape)
        expect("dense.qkv", dense.qkv, (batch, heads * 3 * head_dim))
        expect("dense.w_o", dense.w_o, (hidden, heads * head_dim))
        expect("dense.key_real", dense.key_real, (batch, max_len))
    if mosa is not None:
        if mosa.k.dim() != 4:
            raise ValueError(f"layer_decode: mosa.k must be [batch, heads, capacity + 1, head_dim], got "
                             f"{list(mosa.k.shape)}")
        _, heads, slots, head_dim = mosa.k.shape
        head_dims.add(head_dim)
        expect("mosa.k", mosa.k, (batch, heads, slots, head_dim))
        expect("mosa.v", mosa.v, mosa.k.shape)
        expect("mosa.router_weight", mosa.router_weight, (heads, hidden))
        expect("mosa.thresholds", mosa.thresholds, (heads,))
        expect("mosa.w_qkv", mosa.w_qkv, (heads, hidden, 3 * head_dim))
        expect("mosa.w_o", mosa.w_o, (heads, head_dim, hidden))
        expect("mosa.counts", mosa.counts, (batch, heads))
    if len(head_dims) > 1:
        raise ValueError(f"layer_decode: dense and MoSA heads must share head_dim, got {sorted(head_dims)}")
    head_dim = head_dims.pop()
    if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
        raise ValueError(f"layer_decode: rotary_dim must be even and in 0..{head_dim} (head_dim), got {rotary_dim}")
