"""Fused Triton kernels for the MoSA head op (SPEC §6): forward, backward and the torch.library registration.

Work is grouped by head across the batch: head e's selected rows from all B sequences form B*k rows, and one
program takes a tile of BLOCK_M of them made of whole (b, e) groups (BLOCK_M // k groups of k sorted slots each).
Inside the tile everything is fused:

  forward   gather x rows -> Q|K|V GEMM -> RoPE at the original positions -> causal attention inside each group
            (block-diagonal causal mask over the tile) -> O GEMM -> * score -> atomic fp32 scatter-add into y
  backward  recompute Q|K|V and P in the tile, dO = score * (dy rows @ W_O^T), dscore = rowsum(O * dO / score),
            attention backward, un-rotate, dX rows = dQKV @ W_QKV^T scatter-added into dx (fp32 atomics);
            a second kernel per (head, hidden chunk) contracts the gathered rows into dW_QKV and dW_O.
  router    with router_weight (the layer's default), scores are sigmoid(x_row . w_router[e]): the row kernel turns
            dscore into dlogit = dscore * s (1 - s), adds dlogit * w_router[e] to the dX rows, and the weight kernel
            contracts dlogit with the gathered rows into dW_router. The router's gradient thus costs one column of
            work on rows already in registers, instead of a dense [B, T, E] gradient and two GEMMs.
  split     for selections of k >= SPLIT_MIN_K tokens (`_split_path`) the two projections leave the row kernels:
            `_mosa_qkv_kernel` (a grouped GEMM, the gather in its prologue, three N = d dots) stores every selected
            row's un-rotated Q|K|V [E, B*k, 3d], which the row kernels load instead of projecting, and
            `_mosa_bwd_dx_kernel` turns the stored dQKV into the scattered dX rows. The forward keeps Q|K|V for
            the backward, whose row kernel recomputes O from them. The row kernels keep the attention, the O
            projection and dO, at a quarter of their spills; the price is Q|K|V written and read once per pass, and
            the scatter atomics no longer hidden behind the projections.
  wide      selections of k > MAX_FUSED_K (64 in float32) do not fit a tile's [k, k] scores: they keep the split
            path's projection, dX and weight kernels, and run the attention in PyTorch between them
            (ops/mosa/group_attention.py: SDPA's flash kernels, or the backward written out) on Q and K rotated by
            `_rope_rows_kernel` (and dQ, dK rotated back by it); `_mosa_out_kernel` and `_mosa_bwd_out_kernel` do
            the output projection's two directions on rows of the head-major O and dO.
  settings  untimed variants behind module switches, each covered by the tests (benchmarks/KERNEL_NOTES.md,
            session 14): `TILE_GROUP` (the order of every kernel's (tile, head) programs), `SPLIT_OUTPUT_KERNEL`
            (the split forward's O projection by `_mosa_out_kernel`), `WEIGHTS_SPLIT` (the weight gradients in two
            launches with their own tiles).

Per-row memory kept between forward and backward: the attention output O [E, B*k, d] (same size as x for an IsoFLOP
layer), or on the split path Q|K|V [E, B*k, 3d] (three times that: the backward's dQKV buffer is as large, so the
peak grows less); the backward keeps dQKV [E, B*k, 3d] for the weight kernel. No [B, E, k, h] tensor is stored.
RoPE uses the GPT-NeoX rotate-half layout on the first rotary_dim dims, so each of Q and K is held as three column
segments: the two rotated halves (rotary_dim/2 each) and the pass-through rest. cos/sin come from the same fp32 table
code as the reference (ops/rope.py).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from torch_mosa.ops.rope import rope_table
from torch_mosa.ops.mosa.group_attention import group_attention, group_attention_backward
from torch_mosa.ops.mosa.reference import check_mosa_inputs, document_mask, per_slot_values

MAX_FUSED_K = 128  # 16-bit inputs; float32 tiles of 128 rows overflow shared memory in the backward (H100)
MAX_FUSED_K_FP32 = 64
BLOCK_H = 64
# The weight-gradient kernel's tiles in 16 bits: hidden columns per program, rows per step, warps, pipeline stages
# (None: the row kernels' setting); float32 keeps 64 x 64 x 4 warps. benchmarks/experiments/weights_tiles.py swept
# 36 settings on an H100 (session 11): none beat these by more than 1.5%.
WEIGHTS_TILES = dict(BH=64, BLOCK_R=64, num_warps=4, num_stages=None)
# WEIGHTS_SPLIT: the weight gradients in two launches of the same kernel, each with its own tiles: dW_QKV with
# dW_router (x and dQKV rows), then dW_O (dy and O rows). At the tiles above the kernel does about 44 FLOP per byte
# of rows it loads (48 KB per 64-row step for four [64, 64] x [64, 64] products) and spills 3.9 KB per thread
# (ptxas sm_90a); alone, dW_QKV at 128 hidden columns does about 79 and neither launch spills at these tiles (208
# and 218 registers). Off until timed (benchmarks/experiments/op_kernels_ncu.py --variants).
WEIGHTS_SPLIT = False
WEIGHTS_SPLIT_TILES = {"qkv": dict(BH=128, BLOCK_R=32, num_warps=8, num_stages=None),
                       "o": dict(BH=128, BLOCK_R=64, num_warps=8, num_stages=None)}
# The split path (module docstring): the projection (`_mosa_qkv_kernel`) and the backward's dX rows
# (`_mosa_bwd_dx_kernel`) as grouped GEMMs of their own, the row kernels left with the attention.
# SPLIT_PROJECTION None chooses by k (`_split_path`), True / False force one path. The path sets the shape of what
# the forward keeps, so it is an argument of the custom op, chosen outside it (torch.compile guards on the switch).
# SPLIT_TILES: rows per tile, warps, pipeline stages of the two GEMM kernels in 16 bits (float32 takes half the
# rows and 32-wide hidden chunks): 128 x 8 x 4 was as fast as 64 x 4 x 3 at k = 64 and faster at k = 16
# (split_projection.py, H100).
SPLIT_PROJECTION: Optional[bool] = None
SPLIT_MIN_K = 16
# "out": the wide path's two output-projection kernels (`_mosa_out_kernel`, `_mosa_bwd_out_kernel`), not swept: the
# dx kernel's setting, the nearest in shape (rows x d against d x hidden chunks).
SPLIT_TILES = {"qkv": (128, 8, 4), "dx": (128, 8, 4), "out": (128, 8, 4)}
# SPLIT_OUTPUT_KERNEL: on the split path the forward row kernel stops at the attention output O (stored, [E, B*k, d])
# and the wide path's `_mosa_out_kernel` projects and scatters it, instead of the row kernel doing both (which holds
# a tile's [M, M] probabilities beside its output tiles and spills: 484 bytes per thread at case A's tiles, ptxas
# sm_90a). Off until timed (benchmarks/experiments/op_kernels_ncu.py --variants).
SPLIT_OUTPUT_KERNEL = False
# The order in which each kernel of (tile of rows, head) programs visits them: runs of TILE_GROUP[kernel] tiles,
# every head over one run before the next run, a run's tiles fastest. 0: tiles fastest (all tiles of a head, then
# the next head): a head's weights come from L2, while the rows a kernel gathers from x or dy and the fp32 atomics
# it scatters into tokens spread over the whole batch. 1: heads fastest (the forward row kernel's order since
# session 1): the programs in flight touch a few sequences' rows, which stay in L2, and every run reads all heads'
# weights. Runs of a few tiles trade between the two; benchmarks/experiments/op_kernels_ncu.py --variants times
# them. Keys: the projection, the forward and backward row kernels, the dx kernel, the wide path's forward
# and backward output kernels.
TILE_GROUP = {"qkv": 0, "fwd": 1, "bwd_rows": 0, "dx": 0, "out": 0, "bwd_out": 0}


@triton.jit
def _dot_weight(rows, w_ptrs, w_mask, acc, PREC: tl.constexpr):
    """acc += rows @ W, W loaded through w_ptrs [BLOCK_H, N] (zero where masked)."""
    w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(rows.dtype)
    return tl.dot(rows, w, acc, input_precision=PREC)


@triton.jit
def _project_qkv(x_rows, row_ok, w_e, H: tl.constexpr, D: tl.constexpr, R2: tl.constexpr, BLOCK_M: tl.constexpr,
                 BR: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr):
    """Gathered rows x_rows [BLOCK_M] (row pointers) @ w_e [H, 3D] -> Q and K as (rot1, rot2, pass) segments, V.

    All fp32 accumulators: q1, q2, k1, k2 [BLOCK_M, BR]; q3, k3 [BLOCK_M, BP]; v [BLOCK_M, BD].
    """
    r = tl.arange(0, BR)
    p = tl.arange(0, BP)
    d = tl.arange(0, BD)
    P: tl.constexpr = D - 2 * R2
    q1 = tl.zeros([BLOCK_M, BR], tl.float32)
    q2 = tl.zeros([BLOCK_M, BR], tl.float32)
    k1 = tl.zeros([BLOCK_M, BR], tl.float32)
    k2 = tl.zeros([BLOCK_M, BR], tl.float32)
    q3 = tl.zeros([BLOCK_M, BP], tl.float32)
    k3 = tl.zeros([BLOCK_M, BP], tl.float32)
    v = tl.zeros([BLOCK_M, BD], tl.float32)
    for h0 in range(0, H, BH):
        hs = h0 + tl.arange(0, BH)
        hm = hs < H
        xt = tl.load(x_rows[:, None] + hs[None, :], mask=row_ok[:, None] & hm[None, :], other=0.0)
        w_rows = w_e + hs[:, None] * (3 * D)
        if R2 > 0:
            rm = hm[:, None] & (r < R2)[None, :]
            q1 = _dot_weight(xt, w_rows + r[None, :], rm, q1, PREC)
            q2 = _dot_weight(xt, w_rows + (R2 + r)[None, :], rm, q2, PREC)
            k1 = _dot_weight(xt, w_rows + (D + r)[None, :], rm, k1, PREC)
            k2 = _dot_weight(xt, w_rows + (D + R2 + r)[None, :], rm, k2, PREC)
        if P > 0:
            pm = hm[:, None] & (p < P)[None, :]
            q3 = _dot_weight(xt, w_rows + (2 * R2 + p)[None, :], pm, q3, PREC)
            k3 = _dot_weight(xt, w_rows + (D + 2 * R2 + p)[None, :], pm, k3, PREC)
        v = _dot_weight(xt, w_rows + (2 * D + d)[None, :], hm[:, None] & (d < D)[None, :], v, PREC)
    return q1, q2, q3, k1, k2, k3, v


@triton.jit
def _load_qkv(qkv_rows, row_ok, D: tl.constexpr, R2: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
              BD: tl.constexpr):
    """`_project_qkv`'s segments read from rows of a Q|K|V buffer (qkv_rows [BLOCK_M]: row pointers to 3D values
    each, as `_mosa_qkv_kernel` stores them), in fp32."""
    r = tl.arange(0, BR)
    p = tl.arange(0, BP)
    d = tl.arange(0, BD)
    P: tl.constexpr = D - 2 * R2
    rm = row_ok[:, None] & (r < R2)[None, :]
    pm = row_ok[:, None] & (p < P)[None, :]
    dm = row_ok[:, None] & (d < D)[None, :]
    rows = qkv_rows[:, None]
    q1 = tl.load(rows + r[None, :], mask=rm, other=0.0).to(tl.float32)
    q2 = tl.load(rows + (R2 + r)[None, :], mask=rm, other=0.0).to(tl.float32)
    q3 = tl.load(rows + (2 * R2 + p)[None, :], mask=pm, other=0.0).to(tl.float32)
    k1 = tl.load(rows + (D + r)[None, :], mask=rm, other=0.0).to(tl.float32)
    k2 = tl.load(rows + (D + R2 + r)[None, :], mask=rm, other=0.0).to(tl.float32)
    k3 = tl.load(rows + (D + 2 * R2 + p)[None, :], mask=pm, other=0.0).to(tl.float32)
    v = tl.load(rows + (2 * D + d)[None, :], mask=dm, other=0.0).to(tl.float32)
    return q1, q2, q3, k1, k2, k3, v


@triton.jit
def _flat_rows(tile, B, E, K, e, BLOCK_M: tl.constexpr):
    """Rows tile * BLOCK_M ... of head e's B*k selected rows, in (b, slot) order, whole groups or not: validity,
    flat [B, E, k] selection index, row of the head-major [E, B*k, ...] buffers, token b*T + position to add."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < B * K
    b = rows // K
    sel = (b.to(tl.int64) * E + e) * K + rows % K
    head_row = e.to(tl.int64) * B * K + rows
    return b, ok, sel, head_row


@triton.jit
def _tile_and_head(NUM_TILES, E, TILE_GROUP: tl.constexpr):
    """This program's (tile, head) in `TILE_GROUP`'s order, on the grid `_program_grid` gives it: runs of
    TILE_GROUP tiles (0: all of them), the heads over each run, the run's tiles fastest; the last run may be
    shorter. Runs of all tiles and of one take a 2-D grid, which needs no division."""
    if TILE_GROUP == 0:
        tile = tl.program_id(0)
        e = tl.program_id(1)
    elif TILE_GROUP == 1:
        tile = tl.program_id(1)
        e = tl.program_id(0)
    else:
        pid = tl.program_id(0)
        first = pid // (TILE_GROUP * E) * TILE_GROUP
        tiles_in_run = tl.minimum(TILE_GROUP, NUM_TILES - first)
        rest = pid - first * E
        tile = first + rest % tiles_in_run
        e = rest // tiles_in_run
    return tile, e


@triton.jit
def _mosa_qkv_kernel(x_ptr, w_qkv_ptr, idx_ptr, qkv_ptr, B, T, E, K, NUM_TILES, TILE_GROUP: tl.constexpr,
                     H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                     PREC: tl.constexpr):
    """The split path's projection: qkv[e, rows] = x[selected tokens] @ W_QKV[e], a grouped GEMM with the gather
    in its prologue and three N = d dots (Q, K, V) per hidden chunk, in the inputs' dtype, RoPE not applied.
    Program (tile of BLOCK_M rows, head), in `TILE_GROUP["qkv"]`'s order."""
    tile, e = _tile_and_head(NUM_TILES, E, TILE_GROUP)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b, ok, sel, head_row = _flat_rows(tile, B, E, K, e, BLOCK_M)
    pos = tl.load(idx_ptr + sel, mask=ok, other=0).to(tl.int64)
    x_rows = x_ptr + (b.to(tl.int64) * T + pos) * H
    w_e = w_qkv_ptr + e.to(tl.int64) * H * 3 * D
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.zeros([BLOCK_M, BD], tl.float32)
    k = tl.zeros([BLOCK_M, BD], tl.float32)
    v = tl.zeros([BLOCK_M, BD], tl.float32)
    for h0 in range(0, H, BH):
        hs = h0 + tl.arange(0, BH)
        hm = hs < H
        xt = tl.load(x_rows[:, None] + hs[None, :], mask=ok[:, None] & hm[None, :], other=0.0)
        w_rows = w_e + hs[:, None] * (3 * D) + d[None, :]
        wm = hm[:, None] & dm[None, :]
        q = _dot_weight(xt, w_rows, wm, q, PREC)
        k = _dot_weight(xt, w_rows + D, wm, k, PREC)
        v = _dot_weight(xt, w_rows + 2 * D, wm, v, PREC)
    out = qkv_ptr + head_row[:, None] * (3 * D) + d[None, :]
    om = ok[:, None] & dm[None, :]
    tl.store(out, q.to(DT), mask=om)
    tl.store(out + D, k.to(DT), mask=om)
    tl.store(out + 2 * D, v.to(DT), mask=om)


@triton.jit
def _tile_rows(tile, B, E, K, e, GROUPS, BLOCK_M: tl.constexpr):
    """Rows of a tile: group in tile, slot, batch index, validity, and the flat [B, E, k] selection index."""
    rows = tl.arange(0, BLOCK_M)
    grp = rows // K
    slot = rows % K
    b = tile * GROUPS + grp
    row_ok = (grp < GROUPS) & (b < B)
    sel = (b.to(tl.int64) * E + e) * K + slot
    return grp, slot, b, row_ok, sel


@triton.jit
def _attention_probs(q1, q2, q3, k1, k2, k3, cos, sin, grp, slot, doc, sm_scale, DT: tl.constexpr,
                     R2: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr,
                     DOCS: tl.constexpr):
    """RoPE on Q, K segments, then softmax over each group's causal slots (of the same document, with DOCS)
    -> (rotated q1, q2, k1, k2, P [M, M])."""
    q1, q2 = q1 * cos - q2 * sin, q2 * cos + q1 * sin
    k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
    s = tl.zeros([BLOCK_M, BLOCK_M], tl.float32)
    if R2 > 0:
        s = tl.dot(q1.to(DT), tl.trans(k1.to(DT)), s, input_precision=PREC)
        s = tl.dot(q2.to(DT), tl.trans(k2.to(DT)), s, input_precision=PREC)
    if P > 0:
        s = tl.dot(q3.to(DT), tl.trans(k3.to(DT)), s, input_precision=PREC)
    # same (b, e) group and key slot <= query slot; the diagonal is always open, so no row is all -inf
    allowed = (grp[:, None] == grp[None, :]) & (slot[None, :] <= slot[:, None])
    if DOCS:
        allowed = allowed & (doc[:, None] == doc[None, :])
    logits = tl.where(allowed, s * sm_scale, float("-inf"))
    m = tl.max(logits, 1)
    p = tl.exp(logits - m[:, None])
    p = p / tl.sum(p, 1)[:, None]
    return q1, q2, k1, k2, p


@triton.jit
def _row_positions(pos, tok, row_ok, rope_pos_ptr, doc_ptr, DOCS: tl.constexpr):
    """The rows' RoPE positions and document ids: their positions and one shared document without DOCS, else
    loaded per token from the [B, T] tables (packed documents)."""
    if DOCS:
        rope_pos = tl.load(rope_pos_ptr + tok, mask=row_ok, other=0).to(tl.int64)
        doc = tl.load(doc_ptr + tok, mask=row_ok, other=-1)
    else:
        rope_pos = pos
        doc = pos
    return rope_pos, doc


@triton.jit
def _scatter_rows(out_ptr, values, sel, dest, rows_ok, add_ok, hs, hm, H: tl.constexpr, SLOTS: tl.constexpr):
    """Hidden columns hs of the rows' contributions into their tokens: fp32 atomic adds at the accumulator rows dest
    (of the rows add_ok allows), or with SLOTS (the deterministic combine) each row's own row sel, stored in
    out_ptr's dtype and summed by token afterwards in a fixed order."""
    if SLOTS:
        tl.store(out_ptr + sel[:, None] * H + hs[None, :], values.to(out_ptr.dtype.element_ty),
                 mask=rows_ok[:, None] & hm[None, :])
    else:
        tl.atomic_add(out_ptr + dest[:, None] * H + hs[None, :], values, mask=add_ok[:, None] & hm[None, :],
                      sem="relaxed")


@triton.jit
def _scatter_output(o, w_o_e, score, sel, dest, row_ok, y_ptr, d, H: tl.constexpr, D: tl.constexpr,
                    BH: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, SLOTS: tl.constexpr):
    """score * (O rows @ W_O[e]) (w_o_e: head e's [D, H] block) added into the rows' tokens by hidden chunks."""
    keep = row_ok & (score != 0.0)  # a zero score adds exactly zero
    for h0 in range(0, H, BH):
        hs = h0 + tl.arange(0, BH)
        hm = hs < H
        wo = tl.load(w_o_e + d[:, None] * H + hs[None, :], mask=(d < D)[:, None] & hm[None, :], other=0.0)
        out = tl.dot(o, wo.to(DT), input_precision=PREC) * score[:, None]
        _scatter_rows(y_ptr, out, sel, dest, row_ok, keep, hs, hm, H, SLOTS)


@triton.jit
def _tile_attention(tile, e, x_ptr, w_qkv_ptr, idx_ptr, score_ptr, cos_ptr, sin_ptr, rope_pos_ptr, doc_ptr, qkv_ptr,
                    B, T, E, K, GROUPS, sm_scale, H: tl.constexpr, D: tl.constexpr, R2: tl.constexpr,
                    BLOCK_M: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                    PREC: tl.constexpr, DOCS: tl.constexpr, SPLIT: tl.constexpr):
    """Both row kernels' start, for head e's tile: its rows, their Q|K|V (read from qkv_ptr with SPLIT, else
    projected from x), RoPE's cos / sin at the rows' positions, and the attention probabilities P [M, M] ->
    (row_ok, sel, score, tok, head_row, q1, q2, q3, k1, k2, k3 (Q, K rotated), v, cos, sin, rope_mask, p)."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    P: tl.constexpr = D - 2 * R2
    grp, slot, b, row_ok, sel = _tile_rows(tile, B, E, K, e, GROUPS, BLOCK_M)
    pos = tl.load(idx_ptr + sel, mask=row_ok, other=0).to(tl.int64)
    score = tl.load(score_ptr + sel, mask=row_ok, other=0.0).to(tl.float32)
    tok = b.to(tl.int64) * T + pos
    head_row = e.to(tl.int64) * B * K + b * K + slot
    if SPLIT:
        q1, q2, q3, k1, k2, k3, v = _load_qkv(qkv_ptr + head_row * (3 * D), row_ok, D, R2, BR, BP, BD)
    else:
        w_e = w_qkv_ptr + e.to(tl.int64) * H * 3 * D
        q1, q2, q3, k1, k2, k3, v = _project_qkv(x_ptr + tok * H, row_ok, w_e, H, D, R2, BLOCK_M, BR, BP, BD, BH,
                                                 PREC)
    rope_pos, doc = _row_positions(pos, tok, row_ok, rope_pos_ptr, doc_ptr, DOCS)
    r = tl.arange(0, BR)
    rope_mask = row_ok[:, None] & (r < R2)[None, :]
    cos = tl.load(cos_ptr + rope_pos[:, None] * R2 + r[None, :], mask=rope_mask, other=0.0)
    sin = tl.load(sin_ptr + rope_pos[:, None] * R2 + r[None, :], mask=rope_mask, other=0.0)
    q1, q2, k1, k2, p = _attention_probs(q1, q2, q3, k1, k2, k3, cos, sin, grp, slot, doc, sm_scale, DT, R2, P,
                                         BLOCK_M, PREC, DOCS)
    return row_ok, sel, score, tok, head_row, q1, q2, q3, k1, k2, k3, v, cos, sin, rope_mask, p


@triton.jit
def _mosa_fwd_kernel(x_ptr, w_qkv_ptr, w_o_ptr, idx_ptr, score_ptr, cos_ptr, sin_ptr, rope_pos_ptr, doc_ptr,
                     dest_ptr, y_ptr, o_ptr, qkv_ptr, B, T, E, K, GROUPS, NUM_TILES,
                     TILE_GROUP: tl.constexpr, sm_scale, H: tl.constexpr,
                     D: tl.constexpr, R2: tl.constexpr, BLOCK_M: tl.constexpr, BR: tl.constexpr,
                     BP: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
                     DOCS: tl.constexpr, SLOTS: tl.constexpr, SPLIT: tl.constexpr, SCATTER: tl.constexpr):
    """SPLIT: Q|K|V come from qkv_ptr (`_mosa_qkv_kernel`) instead of the tile's own projection, and O is not
    stored (the backward recomputes it from the kept Q|K|V). Without SCATTER the kernel stops at O, stored for
    `_mosa_out_kernel` (`SPLIT_OUTPUT_KERNEL`). Programs in `TILE_GROUP["fwd"]`'s order."""
    tile, e = _tile_and_head(NUM_TILES, E, TILE_GROUP)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    row_ok, sel, score, tok, head_row, q1, q2, q3, k1, k2, k3, v, cos, sin, rope_mask, p = _tile_attention(
        tile, e, x_ptr, w_qkv_ptr, idx_ptr, score_ptr, cos_ptr, sin_ptr, rope_pos_ptr, doc_ptr, qkv_ptr, B, T, E, K,
        GROUPS, sm_scale, H, D, R2, BLOCK_M, BR, BP, BD, BH, PREC, DOCS, SPLIT)
    o = tl.dot(p.to(DT), v.to(DT), input_precision=PREC).to(DT)
    d = tl.arange(0, BD)
    if not SPLIT or not SCATTER:  # the split path keeps Q|K|V instead, and its backward recomputes O from them
        tl.store(o_ptr + head_row[:, None] * D + d[None, :], o, mask=row_ok[:, None] & (d < D)[None, :])
    if SCATTER:
        dest = tl.load(dest_ptr + sel, mask=row_ok, other=0)
        _scatter_output(o, w_o_ptr + e.to(tl.int64) * D * H, score, sel, dest, row_ok, y_ptr, d, H, D, BH, DT,
                        PREC, SLOTS)


@triton.jit
def _dot_weight_t(grad, w_ptrs, w_mask, acc, PREC: tl.constexpr):
    """acc += grad @ W^T, W loaded through w_ptrs [BLOCK_H, N]."""
    w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(grad.dtype)
    return tl.dot(grad, tl.trans(w), acc, input_precision=PREC)


@triton.jit
def _output_grad(dy_ptr, tok, row_ok, w_o_e, o, score, sel, dscore_ptr, d, H: tl.constexpr, D: tl.constexpr,
                 BH: tl.constexpr, BLOCK_M: tl.constexpr, BD: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                 ROUTER: tl.constexpr):
    """Backward through the output of rows with attention output o (fp32): -> (dO = score * dy rows @ W_O[e]^T
    in DT, dscore = rowsum(O * dO / score)), dscore also stored at dscore_ptr. With ROUTER the score is
    sigmoid(x_row . w_router[e]) and dscore becomes d logit = dscore * s (1 - s), which the dX rows and the weight
    kernel's dW_router take. w_o_e: head e's [D, H] block of W_O."""
    dou = tl.zeros([BLOCK_M, BD], tl.float32)
    for h0 in range(0, H, BH):
        hs = h0 + tl.arange(0, BH)
        hm = hs < H
        g = tl.load(dy_ptr + tok[:, None] * H + hs[None, :], mask=row_ok[:, None] & hm[None, :], other=0.0)
        wo = tl.load(w_o_e + d[:, None] * H + hs[None, :], mask=(d < D)[:, None] & hm[None, :], other=0.0)
        dou = tl.dot(g.to(DT), tl.trans(wo.to(DT)), dou, input_precision=PREC)
    dscore = tl.sum(o * dou, 1)
    if ROUTER:
        dscore = dscore * score * (1.0 - score)
    tl.store(dscore_ptr + sel, dscore, mask=row_ok)
    return (dou * score[:, None]).to(DT), dscore


@triton.jit
def _mosa_bwd_rows_kernel(x_ptr, w_qkv_ptr, w_o_ptr, w_router_ptr, idx_ptr, score_ptr, cos_ptr, sin_ptr,
                          rope_pos_ptr, doc_ptr, dest_ptr, o_ptr, qkv_ptr, dy_ptr, dqkv_ptr, dx_ptr, dscore_ptr,
                          B, T, E, K, GROUPS, NUM_TILES, TILE_GROUP: tl.constexpr, sm_scale, H: tl.constexpr,
                          D: tl.constexpr, R2: tl.constexpr, BLOCK_M: tl.constexpr, BR: tl.constexpr,
                          BP: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
                          ROUTER: tl.constexpr, DOCS: tl.constexpr, SLOTS: tl.constexpr, SPLIT: tl.constexpr):
    """SPLIT: Q|K|V come from qkv_ptr (the forward's `_mosa_qkv_kernel` output), O is recomputed from them and
    stored into o_ptr for the weight kernel, and the dX rows are left to `_mosa_bwd_dx_kernel` (this kernel then
    ends with dQKV, O and dscore stored). Programs in `TILE_GROUP["bwd_rows"]`'s order."""
    tile, e = _tile_and_head(NUM_TILES, E, TILE_GROUP)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    P: tl.constexpr = D - 2 * R2
    row_ok, sel, score, tok, head_row, q1, q2, q3, k1, k2, k3, v, cos, sin, rope_mask, p = _tile_attention(
        tile, e, x_ptr, w_qkv_ptr, idx_ptr, score_ptr, cos_ptr, sin_ptr, rope_pos_ptr, doc_ptr, qkv_ptr, B, T, E, K,
        GROUPS, sm_scale, H, D, R2, BLOCK_M, BR, BP, BD, BH, PREC, DOCS, SPLIT)
    w_e = w_qkv_ptr + e.to(tl.int64) * H * 3 * D
    r = tl.arange(0, BR)
    pp = tl.arange(0, BP)
    d = tl.arange(0, BD)
    d_mask = row_ok[:, None] & (d < D)[None, :]
    if SPLIT:  # O as the forward computed it, stored for the weight kernel
        o = tl.dot(p.to(DT), v.to(DT), input_precision=PREC).to(DT)
        tl.store(o_ptr + head_row[:, None] * D + d[None, :], o, mask=d_mask)
        o = o.to(tl.float32)
    else:
        o = tl.load(o_ptr + head_row[:, None] * D + d[None, :], mask=d_mask, other=0.0).to(tl.float32)

    do, dscore = _output_grad(dy_ptr, tok, row_ok, w_o_ptr + e.to(tl.int64) * D * H, o, score, sel, dscore_ptr, d,
                              H, D, BH, BLOCK_M, BD, DT, PREC, ROUTER)

    # attention backward inside the tile (P is block-diagonal, so whole-tile products stay per group)
    p_dt = p.to(DT)
    dv = tl.dot(tl.trans(p_dt), do, input_precision=PREC)
    dp = tl.dot(do, tl.trans(v.to(DT)), input_precision=PREC)
    ds = p * (dp - tl.sum(p * dp, 1)[:, None]) * sm_scale
    ds_dt = ds.to(DT)
    ds_t = tl.trans(ds_dt)
    dq1 = tl.dot(ds_dt, k1.to(DT), input_precision=PREC)
    dq2 = tl.dot(ds_dt, k2.to(DT), input_precision=PREC)
    dq3 = tl.dot(ds_dt, k3.to(DT), input_precision=PREC)
    dk1 = tl.dot(ds_t, q1.to(DT), input_precision=PREC)
    dk2 = tl.dot(ds_t, q2.to(DT), input_precision=PREC)
    dk3 = tl.dot(ds_t, q3.to(DT), input_precision=PREC)
    # un-rotate: a' = a cos - b sin, b' = b cos + a sin  =>  da = da' cos + db' sin, db = db' cos - da' sin
    dq1, dq2 = dq1 * cos + dq2 * sin, dq2 * cos - dq1 * sin
    dk1, dk2 = dk1 * cos + dk2 * sin, dk2 * cos - dk1 * sin
    dq1, dq2, dq3 = dq1.to(DT), dq2.to(DT), dq3.to(DT)
    dk1, dk2, dk3, dv = dk1.to(DT), dk2.to(DT), dk3.to(DT), dv.to(DT)

    dqkv_rows = dqkv_ptr + head_row[:, None] * (3 * D)
    pass_mask = row_ok[:, None] & (pp < P)[None, :]
    if R2 > 0:
        tl.store(dqkv_rows + r[None, :], dq1, mask=rope_mask)
        tl.store(dqkv_rows + (R2 + r)[None, :], dq2, mask=rope_mask)
        tl.store(dqkv_rows + (D + r)[None, :], dk1, mask=rope_mask)
        tl.store(dqkv_rows + (D + R2 + r)[None, :], dk2, mask=rope_mask)
    if P > 0:
        tl.store(dqkv_rows + (2 * R2 + pp)[None, :], dq3, mask=pass_mask)
        tl.store(dqkv_rows + (D + 2 * R2 + pp)[None, :], dk3, mask=pass_mask)
    tl.store(dqkv_rows + (2 * D + d)[None, :], dv, mask=d_mask)
    # dX rows = dQKV @ W_QKV^T, scatter-added back to the selected positions (with SPLIT, `_mosa_bwd_dx_kernel`)
    if not SPLIT:
        dest = tl.load(dest_ptr + sel, mask=row_ok, other=0)
        for h0 in range(0, H, BH):
            hs = h0 + tl.arange(0, BH)
            hm = hs < H
            w_rows = w_e + hs[:, None] * (3 * D)
            dx = tl.zeros([BLOCK_M, BH], tl.float32)
            if R2 > 0:
                rm = hm[:, None] & (r < R2)[None, :]
                dx = _dot_weight_t(dq1, w_rows + r[None, :], rm, dx, PREC)
                dx = _dot_weight_t(dq2, w_rows + (R2 + r)[None, :], rm, dx, PREC)
                dx = _dot_weight_t(dk1, w_rows + (D + r)[None, :], rm, dx, PREC)
                dx = _dot_weight_t(dk2, w_rows + (D + R2 + r)[None, :], rm, dx, PREC)
            if P > 0:
                pm = hm[:, None] & (pp < P)[None, :]
                dx = _dot_weight_t(dq3, w_rows + (2 * R2 + pp)[None, :], pm, dx, PREC)
                dx = _dot_weight_t(dk3, w_rows + (D + 2 * R2 + pp)[None, :], pm, dx, PREC)
            dx = _dot_weight_t(dv, w_rows + (2 * D + d)[None, :], hm[:, None] & (d < D)[None, :], dx, PREC)
            if ROUTER:
                w_router = tl.load(w_router_ptr + e.to(tl.int64) * H + hs, mask=hm, other=0.0).to(tl.float32)
                dx += dscore[:, None] * w_router[None, :]
            _scatter_rows(dx_ptr, dx, sel, dest, row_ok, row_ok, hs, hm, H, SLOTS)


@triton.jit
def _mosa_bwd_dx_kernel(dqkv_ptr, w_qkv_ptr, w_router_ptr, dscore_ptr, idx_ptr, dest_ptr, dx_ptr, B, E, K,
                        NUM_TILES, TILE_GROUP: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
                        ROUTER: tl.constexpr, SLOTS: tl.constexpr):
    """The split path's dX rows: dQKV [rows, 3D] @ W_QKV[e]^T (+ dlogit * w_router[e] with ROUTER), scatter-added
    into the rows' tokens as the row kernel would (fp32 atomics, or per-slot rows with SLOTS). Program (tile of
    BLOCK_M rows, head), in `TILE_GROUP["dx"]`'s order."""
    tile, e = _tile_and_head(NUM_TILES, E, TILE_GROUP)
    b, ok, sel, head_row = _flat_rows(tile, B, E, K, e, BLOCK_M)
    d = tl.arange(0, BD)
    dm = d < D
    rows = dqkv_ptr + head_row[:, None] * (3 * D) + d[None, :]
    rd = ok[:, None] & dm[None, :]
    dq = tl.load(rows, mask=rd, other=0.0)
    dk = tl.load(rows + D, mask=rd, other=0.0)
    dv = tl.load(rows + 2 * D, mask=rd, other=0.0)
    if ROUTER:
        dlogit = tl.load(dscore_ptr + sel, mask=ok, other=0.0)
    dest = tl.load(dest_ptr + sel, mask=ok, other=0)
    w_e = w_qkv_ptr + e.to(tl.int64) * H * 3 * D
    for h0 in range(0, H, BH):
        hs = h0 + tl.arange(0, BH)
        hm = hs < H
        w_rows = w_e + hs[:, None] * (3 * D) + d[None, :]
        wm = hm[:, None] & dm[None, :]
        dx = tl.zeros([BLOCK_M, BH], tl.float32)
        dx = _dot_weight_t(dq, w_rows, wm, dx, PREC)
        dx = _dot_weight_t(dk, w_rows + D, wm, dx, PREC)
        dx = _dot_weight_t(dv, w_rows + 2 * D, wm, dx, PREC)
        if ROUTER:
            w_router = tl.load(w_router_ptr + e.to(tl.int64) * H + hs, mask=hm, other=0.0).to(tl.float32)
            dx += dlogit[:, None] * w_router[None, :]
        _scatter_rows(dx_ptr, dx, sel, dest, ok, ok, hs, hm, H, SLOTS)


@triton.jit
def _mosa_out_kernel(o_ptr, w_o_ptr, score_ptr, dest_ptr, y_ptr, B, E, K, NUM_TILES, TILE_GROUP: tl.constexpr,
                     H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                     PREC: tl.constexpr, SLOTS: tl.constexpr):
    """The wide path's output: y[token] += score * (O row @ W_O[e]) for every selected row, O [E, B*k, d] from
    `group_attention`; scattered as the forward row kernel does (fp32 atomics, or per-slot rows with SLOTS).
    Program (tile of BLOCK_M rows, head), in `TILE_GROUP["out"]`'s order."""
    tile, e = _tile_and_head(NUM_TILES, E, TILE_GROUP)
    DT: tl.constexpr = o_ptr.dtype.element_ty
    b, ok, sel, head_row = _flat_rows(tile, B, E, K, e, BLOCK_M)
    d = tl.arange(0, BD)
    dm = d < D
    o = tl.load(o_ptr + head_row[:, None] * D + d[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
    score = tl.load(score_ptr + sel, mask=ok, other=0.0).to(tl.float32)
    dest = tl.load(dest_ptr + sel, mask=ok, other=0)
    _scatter_output(o, w_o_ptr + e.to(tl.int64) * D * H, score, sel, dest, ok, y_ptr, d, H, D, BH, DT, PREC, SLOTS)


@triton.jit
def _mosa_bwd_out_kernel(o_ptr, w_o_ptr, idx_ptr, score_ptr, dy_ptr, do_ptr, dscore_ptr, B, T, E, K,
                         NUM_TILES, TILE_GROUP: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
                         ROUTER: tl.constexpr):
    """The wide path's backward through the output: dO = score * (dy rows @ W_O[e]^T) stored for
    `group_attention_backward`, and dscore = rowsum(O * dO / score) (with ROUTER, dlogit = dscore * s (1 - s)), as
    the backward row kernel computes them. Program (tile of BLOCK_M rows, head), in `TILE_GROUP["bwd_out"]`'s
    order."""
    tile, e = _tile_and_head(NUM_TILES, E, TILE_GROUP)
    DT: tl.constexpr = o_ptr.dtype.element_ty
    b, ok, sel, head_row = _flat_rows(tile, B, E, K, e, BLOCK_M)
    pos = tl.load(idx_ptr + sel, mask=ok, other=0).to(tl.int64)
    score = tl.load(score_ptr + sel, mask=ok, other=0.0).to(tl.float32)
    tok = b.to(tl.int64) * T + pos
    d = tl.arange(0, BD)
    dm = d < D
    rd = ok[:, None] & dm[None, :]
    o = tl.load(o_ptr + head_row[:, None] * D + d[None, :], mask=rd, other=0.0).to(tl.float32)
    do, _ = _output_grad(dy_ptr, tok, ok, w_o_ptr + e.to(tl.int64) * D * H, o, score, sel, dscore_ptr, d, H, D, BH,
                         BLOCK_M, BD, DT, PREC, ROUTER)
    tl.store(do_ptr + head_row[:, None] * D + d[None, :], do, mask=rd)


@triton.jit
def _rope_rows_kernel(src_ptr, dst_ptr, pos_ptr, cos_ptr, sin_ptr, ROWS, SRC_STRIDE, DST_STRIDE, D: tl.constexpr,
                      R2: tl.constexpr, BLOCK_M: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
                      INVERSE: tl.constexpr):
    """The wide path's RoPE: d columns of ROWS rows (row strides SRC_STRIDE, DST_STRIDE) copied from src to dst,
    the first rotary_dim rotated by each row's position (pos_ptr) in fp32 as the row kernels rotate, or with
    INVERSE rotated back (the transpose: a gradient with respect to the rotated values -> the un-rotated ones)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < ROWS
    src = src_ptr + rows.to(tl.int64)[:, None] * SRC_STRIDE
    dst = dst_ptr + rows.to(tl.int64)[:, None] * DST_STRIDE
    DT: tl.constexpr = dst_ptr.dtype.element_ty
    if R2 > 0:
        pos = tl.load(pos_ptr + rows, mask=ok, other=0).to(tl.int64)
        r = tl.arange(0, BR)
        rm = ok[:, None] & (r < R2)[None, :]
        cos = tl.load(cos_ptr + pos[:, None] * R2 + r[None, :], mask=rm, other=0.0)
        sin = tl.load(sin_ptr + pos[:, None] * R2 + r[None, :], mask=rm, other=0.0)
        a = tl.load(src + r[None, :], mask=rm, other=0.0).to(tl.float32)
        b = tl.load(src + (R2 + r)[None, :], mask=rm, other=0.0).to(tl.float32)
        if INVERSE:
            a, b = a * cos + b * sin, b * cos - a * sin
        else:
            a, b = a * cos - b * sin, b * cos + a * sin
        tl.store(dst + r[None, :], a.to(DT), mask=rm)
        tl.store(dst + (R2 + r)[None, :], b.to(DT), mask=rm)
    P: tl.constexpr = D - 2 * R2
    if P > 0:
        p = tl.arange(0, BP)
        pm = ok[:, None] & (p < P)[None, :]
        tl.store(dst + (2 * R2 + p)[None, :], tl.load(src + (2 * R2 + p)[None, :], mask=pm, other=0.0), mask=pm)


@triton.jit
def _weights_step(x_ptr, dy_ptr, idx_ptr, score_ptr, dlogit_ptr, o_ptr, dqkv_ptr, acc_q, acc_k, acc_v, acc_o, acc_r,
                  r0, e, hs, hm, d, dm, T, E, K, num_rows, H: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
                  PREC: tl.constexpr, ROUTER: tl.constexpr, DW_QKV: tl.constexpr, DW_O: tl.constexpr):
    """Add rows r0 .. r0 + BLOCK_R of head e to the weight-gradient accumulators (those of W_QKV and the router
    with DW_QKV, of W_O with DW_O), loading only what they need."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    rows = r0 + tl.arange(0, BLOCK_R)
    ok = rows < num_rows
    b = rows // K
    sel = (b.to(tl.int64) * E + e) * K + rows % K
    pos = tl.load(idx_ptr + sel, mask=ok, other=0).to(tl.int64)
    if DW_O:
        score = tl.load(score_ptr + sel, mask=ok, other=0.0).to(tl.float32)
    tok = b.to(tl.int64) * T + pos
    xh_mask = ok[:, None] & hm[None, :]
    if DW_QKV:
        xt = tl.load(x_ptr + tok[:, None] * H + hs[None, :], mask=xh_mask, other=0.0)
    if DW_O:
        g = tl.load(dy_ptr + tok[:, None] * H + hs[None, :], mask=xh_mask, other=0.0).to(DT)
    head_row = e.to(tl.int64) * num_rows + rows
    rd_mask = ok[:, None] & dm[None, :]
    if DW_QKV:
        dqkv_rows = dqkv_ptr + head_row[:, None] * (3 * D) + d[None, :]
        dq = tl.load(dqkv_rows, mask=rd_mask, other=0.0)
        dk = tl.load(dqkv_rows + D, mask=rd_mask, other=0.0)
        dv = tl.load(dqkv_rows + 2 * D, mask=rd_mask, other=0.0)
    if DW_O:
        o = tl.load(o_ptr + head_row[:, None] * D + d[None, :], mask=rd_mask, other=0.0).to(tl.float32)
    if DW_QKV:
        xt_t = tl.trans(xt)
        acc_q = tl.dot(xt_t, dq, acc_q, input_precision=PREC)
        acc_k = tl.dot(xt_t, dk, acc_k, input_precision=PREC)
        acc_v = tl.dot(xt_t, dv, acc_v, input_precision=PREC)
    if DW_O:
        acc_o = tl.dot(tl.trans((o * score[:, None]).to(DT)), g, acc_o, input_precision=PREC)
    if DW_QKV and ROUTER:
        # dW_router chunk = X_s^T dlogit as a tensor-core product: dlogit is column 0 of a [BLOCK_R, 16] operand
        # (a row reduction here cost 0.2 ms in case A)
        dlogit = tl.load(dlogit_ptr + sel, mask=ok, other=0.0)
        column = tl.arange(0, 16)
        dlogit_cols = tl.where(column[None, :] == 0, dlogit[:, None], 0.0).to(DT)
        acc_r = tl.dot(xt_t, dlogit_cols, acc_r, input_precision=PREC)
    return acc_q, acc_k, acc_v, acc_o, acc_r


@triton.jit
def _mosa_bwd_weights_kernel(x_ptr, dy_ptr, idx_ptr, score_ptr, dlogit_ptr, o_ptr, dqkv_ptr, dw_qkv_ptr, dw_o_ptr,
                             dw_router_ptr, B, T, E, K, num_rows, H: tl.constexpr, ROWS_BOUND: tl.constexpr,
                             D: tl.constexpr, BLOCK_R: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                             PREC: tl.constexpr, ROUTER: tl.constexpr, DW_QKV: tl.constexpr, DW_O: tl.constexpr):
    """One program per (head, hidden chunk): with DW_QKV, dW_QKV[e, chunk] = X_s^T dQKV and (with ROUTER)
    dW_router[e, chunk] = dlogit^T X_s; with DW_O, dW_O[e, :, chunk] = (s*O)^T dy_s (both by default; one each in
    two launches of their own tiles with `WEIGHTS_SPLIT`).

    The row loop runs to the run-time row count on the GPU (one compilation for every B*k); ROWS_BOUND > 0 makes
    it a compile-time bound instead, which Triton 3.6's interpreter needs (it cannot loop to a run-time bound).
    """
    num_chunks = tl.cdiv(H, BH)
    pid = tl.program_id(0)
    e = pid // num_chunks
    hs = (pid % num_chunks) * BH + tl.arange(0, BH)
    hm = hs < H
    d = tl.arange(0, BD)
    dm = d < D
    # an accumulator a launch does not use is a [16, 16] placeholder
    QB: tl.constexpr = BH if DW_QKV else 16
    QD: tl.constexpr = BD if DW_QKV else 16
    acc_q = tl.zeros([QB, QD], tl.float32)
    acc_k = tl.zeros([QB, QD], tl.float32)
    acc_v = tl.zeros([QB, QD], tl.float32)
    acc_o = tl.zeros([BD if DW_O else 16, BH if DW_O else 16], tl.float32)
    acc_r = tl.zeros([QB, 16], tl.float32)
    if ROWS_BOUND > 0:
        for r0 in range(0, ROWS_BOUND, BLOCK_R):
            acc_q, acc_k, acc_v, acc_o, acc_r = _weights_step(
                x_ptr, dy_ptr, idx_ptr, score_ptr, dlogit_ptr, o_ptr, dqkv_ptr, acc_q, acc_k, acc_v, acc_o, acc_r,
                r0, e, hs, hm, d, dm, T, E, K, num_rows, H, D, BLOCK_R, PREC, ROUTER, DW_QKV, DW_O)
    else:
        for r0 in range(0, num_rows, BLOCK_R):
            acc_q, acc_k, acc_v, acc_o, acc_r = _weights_step(
                x_ptr, dy_ptr, idx_ptr, score_ptr, dlogit_ptr, o_ptr, dqkv_ptr, acc_q, acc_k, acc_v, acc_o, acc_r,
                r0, e, hs, hm, d, dm, T, E, K, num_rows, H, D, BLOCK_R, PREC, ROUTER, DW_QKV, DW_O)
    # each gradient in its weight's dtype (the op hands the kernels weights of x's dtype: fused_mosa_attention)
    if DW_QKV:
        dw_rows = dw_qkv_ptr + e.to(tl.int64) * H * 3 * D + hs[:, None] * (3 * D) + d[None, :]
        w_mask = hm[:, None] & dm[None, :]
        DW: tl.constexpr = dw_qkv_ptr.dtype.element_ty
        tl.store(dw_rows, acc_q.to(DW), mask=w_mask)
        tl.store(dw_rows + D, acc_k.to(DW), mask=w_mask)
        tl.store(dw_rows + 2 * D, acc_v.to(DW), mask=w_mask)
    if DW_O:
        tl.store(dw_o_ptr + e.to(tl.int64) * D * H + d[:, None] * H + hs[None, :],
                 acc_o.to(dw_o_ptr.dtype.element_ty), mask=dm[:, None] & hm[None, :])
    if DW_QKV and ROUTER:
        dw_router = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, acc_r, 0.0), 1)
        tl.store(dw_router_ptr + e.to(tl.int64) * H + hs, dw_router.to(dw_router_ptr.dtype.element_ty), mask=hm)


@triton.jit
def _combine_slots_kernel(rows_ptr, order_ptr, starts_ptr, out_ptr, H, MAX_ENTRIES: tl.constexpr, BH: tl.constexpr):
    """Program (token t, hidden chunk): out[t] = the sum, in fp32 and in slot order, of the rows of the slots that
    picked t (order[starts[t]:starts[t + 1]]); zeros for a token no slot picked."""
    t = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BH + tl.arange(0, BH)
    hm = hs < H
    start = tl.load(starts_ptr + t)
    end = tl.load(starts_ptr + t + 1)
    acc = tl.zeros([BH], tl.float32)
    if MAX_ENTRIES > 0:  # the interpreter cannot loop to a bound it loaded
        for i in range(0, MAX_ENTRIES):
            live = start + i < end
            slot = tl.load(order_ptr + start + i, mask=live, other=0)
            acc += tl.load(rows_ptr + slot * H + hs, mask=hm & live, other=0.0).to(tl.float32)
    else:
        for i in range(start, end):
            slot = tl.load(order_ptr + i)
            acc += tl.load(rows_ptr + slot * H + hs, mask=hm, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + hs, acc.to(out_ptr.dtype.element_ty), mask=hm)


def _block(n: int) -> int:
    """Smallest power of two >= n and >= 16 (tl.dot needs every dim >= 16)."""
    return max(16, triton.next_power_of_2(n))


def _tile_config(batch: int, k: int, head_dim: int, rotary_dim: int, dtype: torch.dtype) -> dict:
    """Rows per tile, groups per tile, block widths, warps and pipeline depth for the fused row kernels.

    Measured on an H100 (case A, bf16): 64 rows x 4 warps and 128 rows x 8 warps with 64-wide hidden chunks are the
    fastest (3.95 / 3.89 ms fwd+bwd); 128-wide chunks spill. float32 tiles of 128 rows overflow shared memory
    (262 KB) with the default pipeline, so they take 32-wide chunks and a shallower pipeline.
    """
    block_m = 64 if k <= 64 else 128
    block_m = min(block_m, _block(batch * k))
    groups = block_m // k
    wide = dtype == torch.float32
    return dict(block_m=block_m, groups=groups, num_tiles=triton.cdiv(batch, groups),
                BR=_block(rotary_dim // 2), BP=_block(head_dim - rotary_dim), BD=_block(head_dim),
                BH=32 if wide else BLOCK_H, num_warps=4 if block_m <= 64 else 8,
                num_stages=2 if (wide or block_m > 64) else 3)


def _forward_tile_config(batch: int, k: int, head_dim: int, rotary_dim: int, dtype: torch.dtype) -> dict:
    """The forward kernel's tiles: the backward's, except that 16-bit selections of k <= 16 tokens in at least 512
    rows per head take 128 rows (8 or more whole groups) x 8 warps, keeping the 3-stage pipeline of 64-row tiles.

    Measured with benchmarks/experiments/tile_sweep.py (H100, bf16, forward of the op; results/tile-sweep-h100-
    2026-11-23.log): SPEC §6 case A (k 16, 1024 rows per head) 1.30 -> 1.20 ms; case B (k 64) was slower with 128
    rows (1.19 -> 1.23 ms), so larger k keep the default. Case C (k 16, 256 rows per head) ran its op forward faster
    too (0.57 -> 0.50 ms) but its whole layer slower (4.69 -> 4.99 ms forward + backward,
    results/forward-tiles-layer-h100-2026-11-23.log), likely because 128-row tiles halve its programs per head.
    The backward was fastest with the default tiles. The forward's tiles are its own: what it saves for the backward
    (O [E, B*k, d]) does not depend on them.
    """
    cfg = _tile_config(batch, k, head_dim, rotary_dim, dtype)
    if dtype != torch.float32 and k <= 16 and batch * k >= 512:
        groups = 128 // k
        cfg.update(block_m=128, groups=groups, num_tiles=triton.cdiv(batch, groups), num_warps=8)
    return cfg


def _dot_precision(dtype: torch.dtype) -> str:
    # float32: three-pass tf32 keeps ~fp32 accuracy on tensor cores; 16-bit operands ignore the setting
    return "tf32x3" if dtype == torch.float32 else "tf32"


_ROPE_TABLES: dict = {}


def _rope_tables(seq_len: int, rotary_dim: int, rope_base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rotary_dim/2] fp32 by position, from the reference's own table code (ops.rope.rope_table).

    Kept per (T, rotary_dim, base, device): building them is ~10 small launches, paid by every layer in forward and
    backward otherwise (the layer is launch-bound at small batches, SPEC §6 case C).
    """
    key = (seq_len, rotary_dim, float(rope_base), torch.device(device))
    if key not in _ROPE_TABLES:
        if len(_ROPE_TABLES) >= 64:  # many distinct lengths (evaluation, generation): start over
            _ROPE_TABLES.clear()
        half = rotary_dim // 2
        if half == 0:
            empty = torch.zeros(1, device=device, dtype=torch.float32)
            _ROPE_TABLES[key] = empty, empty
        else:
            cos, sin = rope_table(seq_len, rotary_dim, rope_base, torch.float32, device)
            _ROPE_TABLES[key] = cos[:, :half].contiguous(), sin[:, :half].contiguous()
    return _ROPE_TABLES[key]


def _accumulator_rows(indices: torch.Tensor, seq_len: int):
    """Where each selected row accumulates in fp32: (dest [B, E, k] int64, accumulator rows, flat tokens or None).

    Dense mode (None): the accumulator is [B*T, h] and dest is the flat token b*T + position. When the selections
    cover under half of the tokens (long sequences, case D) a compact [B*E*k, h] accumulator is used instead: every
    token gets one row (the winner of a scatter among the slots that picked it) and only those rows are written
    back, so no fp32 [B, T, h] buffer is filled, read and cast.
    """
    batch = indices.shape[0]
    tokens = _slot_tokens(indices, seq_len)
    if 2 * tokens.numel() >= batch * seq_len:
        return tokens.view(indices.shape), batch * seq_len, None
    row_of_token = torch.full((batch * seq_len,), -1, dtype=torch.long, device=indices.device)
    row_of_token.scatter_(0, tokens, torch.arange(tokens.numel(), device=indices.device))
    return row_of_token[tokens].view(indices.shape), tokens.numel(), tokens


def _slot_tokens(indices: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The flat token b*T + position of every selection slot, in [B, E, k] order: [B*E*k] int64."""
    offsets = torch.arange(indices.shape[0], device=indices.device).view(-1, 1, 1) * seq_len
    return (indices.long() + offsets).reshape(-1)


def _combine_slots(slot_rows: torch.Tensor, indices: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Deterministic combine: per-slot rows [B*E*k, h] (one per selection slot, [B, E, k] order) summed into
    their tokens -> [B, T, h] in dtype. A token-major segmented sum over a CSR of the slots (a stable sort of their
    tokens): each token adds its slots' rows in slot order in fp32, so the result is bitwise reproducible, unlike
    the kernels' fp32 atomics, and no fp32 [B*T, h] buffer is zeroed, accumulated into and cast."""
    batch, seq_len, hidden = shape
    sorted_tokens, order = torch.sort(_slot_tokens(indices, seq_len), stable=True)
    starts = torch.searchsorted(sorted_tokens, torch.arange(batch * seq_len + 1, device=indices.device))
    out = torch.empty(shape, device=slot_rows.device, dtype=dtype)
    max_entries = max(1, int((starts[1:] - starts[:-1]).max())) if _interpreting() else 0
    block_h = min(1024, _block(hidden))
    _combine_slots_kernel[(batch * seq_len, triton.cdiv(hidden, block_h))](
        slot_rows, order, starts, out, hidden, MAX_ENTRIES=max_entries, BH=block_h, num_warps=4)
    return out


def _token_rows(indices: torch.Tensor, shape, dtype, deterministic: bool):
    """What the kernels scatter selected rows into, for a [B, T, h] result -> (dest, buffer, tokens): fp32 atomics
    into an accumulator (`_accumulator_rows`), or with `deterministic` one row per selection slot ([B*E*k, h] in
    dtype, dest = indices, tokens None) for `_combine_slots` to sum in a fixed order. `_sum_by_token` finishes."""
    _, seq_len, hidden = shape
    if deterministic:
        rows = torch.empty(indices.numel(), hidden, device=indices.device, dtype=dtype)
        return indices, rows, None
    dest, acc_rows, tokens = _accumulator_rows(indices, seq_len)
    return dest, torch.zeros(acc_rows, hidden, device=indices.device, dtype=torch.float32), tokens


def _sum_by_token(buffer: torch.Tensor, indices: torch.Tensor, dest: torch.Tensor, tokens, shape, dtype,
                  deterministic: bool) -> torch.Tensor:
    """`_token_rows`' buffer after the kernels -> the [B, T, h] result in dtype."""
    if deterministic:
        return _combine_slots(buffer, indices, shape, dtype)
    return _write_back(buffer, dest, tokens, shape, dtype)


def _write_back(acc: torch.Tensor, dest: torch.Tensor, tokens, shape, dtype) -> torch.Tensor:
    """fp32 accumulator -> [B, T, h] in dtype (zeros where no slot points)."""
    if tokens is None:
        return acc.view(shape).to(dtype)
    out = torch.zeros(shape, device=acc.device, dtype=dtype)
    out.view(-1, shape[-1]).index_copy_(0, tokens, acc.index_select(0, dest.reshape(-1)).to(dtype))
    return out


def _split_path(k: int) -> bool:
    """Whether selections of k tokens take the split path. Measured on an H100 (bf16, compiled, dense timed in the
    same run; benchmarks/results/split-keeps-qkv-h100-2026-11-24-1439.log, split-train-step-h100-2026-11-24-1436.log):
    since the split path keeps Q|K|V for the backward (session 11) it is faster at every k measured, 16 to 64:
    - SPEC §6 layers: A (k 16) 5.35 against 5.52 ms fused, B (k 64) 5.13 against 5.93, C (k 16) 3.44 against 3.50;
      peak memory A 0.98x dense (fused 0.83x), B 0.97x (0.76x), C 1.33x (1.30x);
    - Tiny training steps: sparsity 64 (k 16) 0.66x dense against 0.65x, sparsity 16 (k 64) 0.72x against
      0.66-0.67x, the 4 + 17 model (k 32) 1.13x against 1.11x.
    Below k = 16 it is unmeasured, so those stay fused."""
    return SPLIT_PROJECTION if SPLIT_PROJECTION is not None else k >= SPLIT_MIN_K


def _wide(k: int, dtype: torch.dtype) -> bool:
    """Whether selections of k tokens are too wide for the row kernels' tiles (a whole group's [k, k] scores in
    registers: k <= MAX_FUSED_K, 64 in float32, where 128-row tiles overflow shared memory in the backward). They take
    the wide path: the split path's GEMM kernels around PyTorch's attention (ops/mosa/group_attention.py)."""
    return k > (MAX_FUSED_K_FP32 if dtype == torch.float32 else MAX_FUSED_K)


def _program_grid(num_tiles: int, num_heads: int, tile_group: int) -> tuple:
    """The launch grid of a kernel of (tile, head) programs taken in `tile_group`'s order (`_tile_and_head`)."""
    if isinstance(tile_group, bool) or not isinstance(tile_group, int) or tile_group < 0:
        raise ValueError(f"TILE_GROUP values must be integers >= 0 (0: all tiles), got {tile_group!r}")
    if tile_group == 0:
        return num_tiles, num_heads
    if tile_group == 1:
        return num_heads, num_tiles
    return (num_tiles * num_heads,)


def _split_launch(kernel: str, rows: int, dtype: torch.dtype) -> dict:
    """Grid rows and launch settings of a split-path GEMM kernel ("qkv", "dx" or "out") over `rows` rows per head."""
    block_m, warps, stages = SPLIT_TILES[kernel]
    wide = dtype == torch.float32
    if wide:
        block_m = max(16, block_m // 2)
    block_m = min(block_m, _block(rows))
    return dict(tiles=triton.cdiv(rows, block_m), BLOCK_M=block_m, BH=32 if wide else BLOCK_H,
                PREC=_dot_precision(dtype), num_warps=warps, num_stages=stages)


def _selected_qkv(x: torch.Tensor, w_qkv: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Q|K|V of every selected row, un-rotated, in x.dtype: [E, B*k, 3d] (the split path's projection)."""
    batch, seq_len, hidden = x.shape
    num_heads, _, three_d = w_qkv.shape
    k = indices.shape[-1]
    qkv = torch.empty(num_heads, batch * k, three_d, device=x.device, dtype=x.dtype)
    launch = _split_launch("qkv", batch * k, x.dtype)
    tiles = launch.pop("tiles")
    _mosa_qkv_kernel[_program_grid(tiles, num_heads, TILE_GROUP["qkv"])](
        x, w_qkv, indices, qkv, batch, seq_len, num_heads, k, tiles, TILE_GROUP["qkv"], H=hidden, D=three_d // 3,
        BD=_block(three_d // 3), **launch)
    return qkv


def _rotate_rows(src: torch.Tensor, dst: torch.Tensor, rope_positions: torch.Tensor, cos, sin, rotary_dim: int,
                 head_dim: int, src_stride: int, dst_stride: int, inverse: bool = False) -> None:
    """`_rope_rows_kernel` over rope_positions.numel() rows: the first head_dim columns of src and dst (tensors or
    views whose rows follow each other at these strides), rope_positions one int32 per row."""
    rows = rope_positions.numel()
    # 32 rows x 4 warps: 40-70 registers per thread at d 64 (ptxas, sm_90a); 128 rows took 144-255 and spilled
    # without RoPE. Not yet timed.
    block_m = min(32, _block(rows))
    _rope_rows_kernel[(triton.cdiv(rows, block_m),)](
        src, dst, rope_positions, cos, sin, rows, src_stride, dst_stride, D=head_dim, R2=rotary_dim // 2,
        BLOCK_M=block_m, BR=_block(rotary_dim // 2), BP=_block(head_dim - rotary_dim), INVERSE=inverse, num_warps=4)


def _wide_attention(qkv: torch.Tensor, indices: torch.Tensor, rotary_dim: int, rope_base: float, seq_len: int,
                    positions=None, document_ids=None, for_backward: bool = False):
    """The wide path's attention on the split path's un-rotated Q|K|V [E, B*k, 3d]: Q and K rotated by
    `_rope_rows_kernel`, then `group_attention` -> (its GroupAttention, the rows' RoPE positions [E*B*k] int32,
    the cos and sin tables), the last two for rotating the gradients back."""
    batch, num_heads, k = indices.shape
    head_dim = qkv.shape[-1] // 3
    rope_positions = (indices if positions is None else per_slot_values(positions, indices)).transpose(0, 1)
    rope_positions = rope_positions.to(torch.int32).contiguous()
    tables = _rope_tables(seq_len, rotary_dim, rope_base, qkv.device)
    q = torch.empty(num_heads, batch, k, head_dim, device=qkv.device, dtype=qkv.dtype)
    key = torch.empty_like(q)
    for column, rotated in ((0, q), (head_dim, key)):
        _rotate_rows(qkv[..., column:], rotated, rope_positions, *tables, rotary_dim, head_dim, 3 * head_dim,
                     head_dim)
    v = qkv.view(num_heads, batch, k, 3 * head_dim)[..., 2 * head_dim:]
    allowed = None
    if document_ids is not None:
        allowed = document_mask(per_slot_values(document_ids, indices).transpose(0, 1))
    return group_attention(q, key, v, allowed, for_backward), rope_positions, tables


def _wide_attention_backward(attention, do: torch.Tensor, rope_positions, tables, rotary_dim: int,
                             deterministic: bool) -> torch.Tensor:
    """dQ|dK|dV [E, B*k, 3d] with respect to the un-rotated Q|K|V, given dO [E, B*k, d] (`_wide_attention`'s
    outputs for the rest)."""
    num_heads, batch, k, head_dim = attention.q.shape
    dq, dk, dv = group_attention_backward(attention, do.view(num_heads, batch, k, head_dim), deterministic)
    dqkv = torch.empty(num_heads, batch * k, 3 * head_dim, device=do.device, dtype=do.dtype)
    for column, grad in ((0, dq), (head_dim, dk)):
        _rotate_rows(grad.contiguous(), dqkv[..., column:], rope_positions, *tables, rotary_dim, head_dim, head_dim,
                     3 * head_dim, inverse=True)
    dqkv.view(num_heads, batch, k, 3 * head_dim)[..., 2 * head_dim:] = dv
    return dqkv


def mosa_fwd(x, w_qkv, w_o, indices, scores, rotary_dim: int, rope_base: float, positions=None, document_ids=None,
             deterministic: bool = False, split: Optional[bool] = None):
    """-> y [B, T, h] in x.dtype, and what the backward needs per selected row: the attention output O [E, B*k, d]
    on the fused path, the un-rotated Q|K|V [E, B*k, 3d] on the split path (`_split_path`; `mosa_bwd` tells
    them apart by width). positions, document_ids: the [B, T] int32 tables of packed documents (both or neither).
    deterministic: each slot writes its own output row (x.dtype) and `_combine_slots` sums them, instead of fp32
    atomics. split: the path (None: `_split_path(k)`); selections too wide for the row kernels (`_wide`) take the
    wide path whatever it says, and keep Q|K|V as the split path does."""
    batch, seq_len, hidden = x.shape
    num_heads, _, three_d = w_qkv.shape
    head_dim, k = three_d // 3, indices.shape[-1]
    dest, y, tokens = _token_rows(indices, x.shape, x.dtype, deterministic)
    docs = document_ids is not None
    if _wide(k, x.dtype):  # the split path's kernels around PyTorch's attention (ops/mosa/group_attention.py)
        qkv = saved = _selected_qkv(x, w_qkv, indices)
        attention = _wide_attention(qkv, indices, rotary_dim, rope_base, seq_len, positions if docs else None,
                                    document_ids)[0]
        _scatter_attention_output(attention.o.view(num_heads, batch * k, head_dim), w_o, scores, dest, y,
                                  deterministic)
    else:
        saved = _mosa_fwd_rows(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base, positions, document_ids,
                               dest, y, deterministic, _split_path(k) if split is None else split)
    return _sum_by_token(y, indices, dest, tokens, x.shape, x.dtype, deterministic), saved


def _scatter_attention_output(o: torch.Tensor, w_o: torch.Tensor, scores: torch.Tensor, dest: torch.Tensor,
                              y: torch.Tensor, deterministic: bool) -> None:
    """y[dest] += score * (O row @ W_O[e]) for every selected row (`_mosa_out_kernel`): O [E, B*k, d]."""
    batch, num_heads, k = scores.shape
    head_dim, hidden = w_o.shape[1:]
    launch = _split_launch("out", batch * k, o.dtype)
    tiles = launch.pop("tiles")
    _mosa_out_kernel[_program_grid(tiles, num_heads, TILE_GROUP["out"])](
        o, w_o, scores, dest, y, batch, num_heads, k, tiles, TILE_GROUP["out"], H=hidden, D=head_dim,
        BD=_block(head_dim), SLOTS=deterministic, **launch)


def _mosa_fwd_rows(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base, positions, document_ids, dest, y,
                   deterministic: bool, split: bool) -> torch.Tensor:
    """`mosa_fwd`'s row kernel (and on the split path the projection before it, and with `SPLIT_OUTPUT_KERNEL` the
    output kernel after it) adding into y -> what the backward keeps (O, or Q|K|V on the split path)."""
    batch, seq_len, hidden = x.shape
    num_heads, _, three_d = w_qkv.shape
    head_dim, k = three_d // 3, indices.shape[-1]
    cfg = _forward_tile_config(batch, k, head_dim, rotary_dim, x.dtype)
    cos, sin = _rope_tables(seq_len, rotary_dim, rope_base, x.device)
    docs = document_ids is not None
    scatter = not (split and SPLIT_OUTPUT_KERNEL)
    if split:
        qkv = saved = _selected_qkv(x, w_qkv, indices)
        # O is stored only for the output kernel (qkv a placeholder otherwise: not written)
        o = qkv if scatter else torch.empty(num_heads, batch * k, head_dim, device=x.device, dtype=x.dtype)
    else:
        o = saved = torch.empty(num_heads, batch * k, head_dim, device=x.device, dtype=x.dtype)
        qkv = o  # (a placeholder: not read)
    _mosa_fwd_kernel[_program_grid(cfg["num_tiles"], num_heads, TILE_GROUP["fwd"])](
        x, w_qkv, w_o, indices, scores, cos, sin, positions if docs else indices, document_ids if docs else indices,
        dest, y, o, qkv, batch, seq_len, num_heads, k, cfg["groups"], cfg["num_tiles"], TILE_GROUP["fwd"],
        head_dim ** -0.5, H=hidden, D=head_dim, R2=rotary_dim // 2, BLOCK_M=cfg["block_m"], BR=cfg["BR"],
        BP=cfg["BP"], BD=cfg["BD"], BH=cfg["BH"], PREC=_dot_precision(x.dtype), DOCS=docs, SLOTS=deterministic,
        SPLIT=split, SCATTER=scatter, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if not scatter:
        _scatter_attention_output(o, w_o, scores, dest, y, deterministic)
    return saved


def mosa_bwd(dy, x, w_qkv, w_o, w_router, indices, scores, saved, rotary_dim: int, rope_base: float,
             positions=None, document_ids=None, deterministic: bool = False):
    """-> dx, dw_qkv, dw_o, and dscores (w_router None) or dw_router (scores are sigmoid(x . w_router)); each in
    its input's dtype. saved: `mosa_fwd`'s second output (O, or Q|K|V on the split path).

    The row kernel runs tiles fastest (TILE_GROUP["bwd_rows"] = 0: all tiles of a head before the next head), so a
    head's weights are read from L2 by its tiles: 2.61 -> 2.17 ms in case A, 1.12 -> 0.92 ms in case C against
    heads fastest (the fused path's row kernel; H100, 2026-11-23, benchmarks/results/grid-order-and-pieces-h100-
    2026-11-23.log).
    """
    batch, seq_len, hidden = x.shape
    num_heads, _, three_d = w_qkv.shape
    head_dim, k = three_d // 3, indices.shape[-1]
    router = w_router is not None
    precision = _dot_precision(x.dtype)
    dest, dx, tokens = _token_rows(indices, x.shape, x.dtype, deterministic)  # dX rows, summed by token after
    dscores = torch.empty(batch, num_heads, k, device=x.device, dtype=torch.float32)
    docs = document_ids is not None
    split = saved.shape[-1] == three_d  # the forward chose (the switch may have changed since)
    block_d = _block(head_dim)
    if _wide(k, x.dtype):  # O recomputed, dO and dscore by kernel, the attention's backward in PyTorch
        attention, rope_positions, tables = _wide_attention(saved, indices, rotary_dim, rope_base, seq_len,
                                                            positions if docs else None, document_ids,
                                                            for_backward=True)
        o = attention.o.view(num_heads, batch * k, head_dim)
        do = torch.empty_like(o)
        launch = _split_launch("out", batch * k, x.dtype)
        tiles = launch.pop("tiles")
        _mosa_bwd_out_kernel[_program_grid(tiles, num_heads, TILE_GROUP["bwd_out"])](
            o, w_o, indices, scores, dy, do, dscores, batch, seq_len, num_heads, k, tiles, TILE_GROUP["bwd_out"],
            H=hidden, D=head_dim, BD=block_d, ROUTER=router, **launch)
        dqkv = _wide_attention_backward(attention, do, rope_positions, tables, rotary_dim, deterministic)
        num_stages = 2  # what _tile_config gives every selection this wide
    else:
        cfg = _tile_config(batch, k, head_dim, rotary_dim, x.dtype)
        cos, sin = _rope_tables(seq_len, rotary_dim, rope_base, x.device)
        dqkv = torch.empty(num_heads, batch * k, three_d, device=x.device, dtype=x.dtype)
        if split:  # the row kernel recomputes O and stores it here for the weight kernel
            qkv, o = saved, torch.empty(num_heads, batch * k, head_dim, device=x.device, dtype=x.dtype)
        else:
            qkv, o = saved, saved  # (qkv a placeholder: not read)
        _mosa_bwd_rows_kernel[_program_grid(cfg["num_tiles"], num_heads, TILE_GROUP["bwd_rows"])](
            x, w_qkv, w_o, w_router if router else x, indices, scores, cos, sin, positions if docs else indices,
            document_ids if docs else indices, dest, o, qkv, dy, dqkv, dx, dscores, batch, seq_len, num_heads, k,
            cfg["groups"], cfg["num_tiles"], TILE_GROUP["bwd_rows"], head_dim ** -0.5, H=hidden,
            D=head_dim, R2=rotary_dim // 2, BLOCK_M=cfg["block_m"], BR=cfg["BR"], BP=cfg["BP"], BD=cfg["BD"],
            BH=cfg["BH"], PREC=precision, ROUTER=router, DOCS=docs, SLOTS=deterministic, SPLIT=split,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        num_stages = cfg["num_stages"]
    if split:
        launch = _split_launch("dx", batch * k, x.dtype)
        tiles = launch.pop("tiles")
        _mosa_bwd_dx_kernel[_program_grid(tiles, num_heads, TILE_GROUP["dx"])](
            dqkv, w_qkv, w_router if router else x, dscores, indices, dest, dx, batch, num_heads, k, tiles,
            TILE_GROUP["dx"], H=hidden, D=head_dim, BD=block_d, ROUTER=router, SLOTS=deterministic, **launch)
    dw_qkv = torch.empty_like(w_qkv)
    dw_o = torch.empty_like(w_o)
    dw_router = torch.empty_like(w_router) if router else dw_o
    if x.dtype == torch.float32:
        launches = [(True, True, dict(BH=BLOCK_H, BLOCK_R=64, num_warps=4, num_stages=None))]
    elif WEIGHTS_SPLIT:
        launches = [(True, False, WEIGHTS_SPLIT_TILES["qkv"]), (False, True, WEIGHTS_SPLIT_TILES["o"])]
    else:
        launches = [(True, True, WEIGHTS_TILES)]
    for dw_qkv_part, dw_o_part, tiles in launches:
        _mosa_bwd_weights_kernel[(num_heads * triton.cdiv(hidden, tiles["BH"]),)](
            x, dy, indices, scores, dscores, o, dqkv, dw_qkv, dw_o, dw_router,
            batch, seq_len, num_heads, k, batch * k, H=hidden, ROWS_BOUND=batch * k if _interpreting() else 0,
            D=head_dim, BD=block_d, PREC=precision, ROUTER=router, DW_QKV=dw_qkv_part, DW_O=dw_o_part,
            **{**tiles, "num_stages": tiles["num_stages"] or num_stages})
    dx = _sum_by_token(dx, indices, dest, tokens, x.shape, x.dtype, deterministic)
    return dx, dw_qkv, dw_o, (dw_router if router else dscores.to(scores.dtype))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.library.custom_op("torch_mosa::mosa_attention_fwd", mutates_args=())
def _mosa_fwd_op(x: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor, w_router: Optional[torch.Tensor],
                 indices: torch.Tensor, scores: torch.Tensor, rotary_dim: int, rope_base: float,
                 positions: Optional[torch.Tensor], document_ids: Optional[torch.Tensor], deterministic: bool,
                 split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return mosa_fwd(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base, positions, document_ids, deterministic,
                    split)


@_mosa_fwd_op.register_fake
def _mosa_fwd_fake(x, w_qkv, w_o, w_router, indices, scores, rotary_dim, rope_base, positions, document_ids,
                   deterministic, split):
    num_heads, _, three_d = w_qkv.shape
    keeps_qkv = split or _wide(indices.shape[-1], x.dtype)
    return x.new_empty(x.shape), x.new_empty(num_heads, x.shape[0] * indices.shape[-1],
                                             three_d if keeps_qkv else three_d // 3)


@torch.library.custom_op("torch_mosa::mosa_attention_bwd", mutates_args=())
def _mosa_bwd_op(dy: torch.Tensor, x: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor,
                 w_router: Optional[torch.Tensor], indices: torch.Tensor, scores: torch.Tensor, saved: torch.Tensor,
                 rotary_dim: int, rope_base: float, positions: Optional[torch.Tensor],
                 document_ids: Optional[torch.Tensor], deterministic: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return mosa_bwd(dy, x, w_qkv, w_o, w_router, indices, scores, saved, rotary_dim, rope_base, positions,
                    document_ids, deterministic)


@_mosa_bwd_op.register_fake
def _mosa_bwd_fake(dy, x, w_qkv, w_o, w_router, indices, scores, saved, rotary_dim, rope_base, positions,
                   document_ids, deterministic):
    last = w_router.new_empty(w_router.shape) if w_router is not None else scores.new_empty(scores.shape)
    return x.new_empty(x.shape), w_qkv.new_empty(w_qkv.shape), w_o.new_empty(w_o.shape), last


def _setup_context(ctx, inputs, output):
    x, w_qkv, w_o, w_router, indices, scores, rotary_dim, rope_base, positions, document_ids, deterministic, _ = inputs
    ctx.save_for_backward(x, w_qkv, w_o, w_router, indices, scores, output[1], positions, document_ids)
    ctx.rotary_dim, ctx.rope_base, ctx.deterministic = rotary_dim, rope_base, deterministic


def _input_gradients(ctx, dy, backward_op):
    """Gradients of the forward op's 12 inputs from `backward_op` (the custom op, or mosa_bwd in eager mode)."""
    x, w_qkv, w_o, w_router, indices, scores, saved, positions, document_ids = ctx.saved_tensors
    dx, dw_qkv, dw_o, last = backward_op(dy.contiguous(), x, w_qkv, w_o, w_router, indices, scores, saved,
                                         ctx.rotary_dim, ctx.rope_base, positions, document_ids, ctx.deterministic)
    if w_router is None:
        return dx, dw_qkv, dw_o, None, None, last, None, None, None, None, None, None
    return dx, dw_qkv, dw_o, last, None, None, None, None, None, None, None, None


def _backward(ctx, dy, _d_saved):
    return _input_gradients(ctx, dy, _mosa_bwd_op)


_mosa_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerMosaFunction(torch.autograd.Function):
    """The custom ops' forward and backward as a plain autograd.Function, for eager mode: the custom ops exist so
    that torch.compile can trace the op (fake impls, no graph break), and in eager mode their dispatch costs the
    host about 110 us more per forward + backward (benchmarks/experiments/custom_op_host_cost_cpu.py), which
    layers at small batches wait on (SPEC §6 case C is bound by the host)."""

    @staticmethod
    def forward(ctx, x, w_qkv, w_o, w_router, indices, scores, rotary_dim, rope_base, positions, document_ids,
                deterministic, split):
        y, saved = mosa_fwd(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base, positions, document_ids,
                            deterministic, split)
        _setup_context(ctx, (x, w_qkv, w_o, w_router, indices, scores, rotary_dim, rope_base, positions,
                             document_ids, deterministic, split), (y, saved))
        return y

    @staticmethod
    def backward(ctx, dy):
        return _input_gradients(ctx, dy, mosa_bwd)


def mosa_attention_triton(x: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor, indices: torch.Tensor,
                          scores: torch.Tensor, *, rotary_dim: int, rope_base: float,
                          router_weight: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                          document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Fused MoSA heads: same contract as `mosa_attention_reference`.

    x [B, T, h]; w_qkv [E, h, 3*d] (Q|K|V); w_o [E, d, h]; indices [B, E, k] int64 positions, ascending per (b, e)
    except that score-0 padding slots come last; scores [B, E, k]; router_weight [E, h] or None. Returns
    y [B, T, h] in x.dtype, accumulated in fp32. Differentiable in x, w_qkv, w_o and either scores or, when
    router_weight is given, router_weight (scores are then sigmoid(x[position] . router_weight[e]) and get no
    gradient); positions, document_ids [B, T] or None describe packed documents. k > MAX_FUSED_K (64 in float32)
    takes the wide path (module docstring).
    """
    check_mosa_inputs(x, w_qkv, w_o, indices, scores, rotary_dim, router_weight, positions, document_ids)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    return fused_mosa_attention(x, w_qkv, w_o, indices, scores, rotary_dim, rope_base, router_weight, positions,
                                document_ids)


def fused_mosa_attention(x, w_qkv, w_o, indices, scores, rotary_dim: int, rope_base: float, router_weight=None,
                         positions=None, document_ids=None, deterministic: bool = False):
    """`mosa_attention_triton` on arguments already checked (the dispatch point checks them once). deterministic:
    heads are summed into tokens by a fixed-order reduction instead of fp32 atomics (bitwise reproducible under
    torch.use_deterministic_algorithms(True); more memory: one output row per selected slot)."""
    # float32 weights with 16-bit x are rounded to x's dtype here, differentiably (their gradients come back in
    # float32), so the kernels read 16-bit tiles: 4-byte tiles were slower in the Tiny training step (H100, session
    # 13: 0.655-0.662x dense against 0.671x at sparsity 64, 0.698-0.702x against 0.724x at sparsity 16), and a CUDA
    # test of the fused path with them met an illegal memory access that no run isolated (KERNEL_NOTES.md)
    w_qkv, w_o = w_qkv.to(x.dtype), w_o.to(x.dtype)
    if router_weight is not None:
        router_weight = router_weight.to(x.dtype).contiguous()
    if positions is not None or document_ids is not None:  # the kernels read both as [B, T] int32 tables
        batch, seq_len = x.shape[:2]
        default = torch.arange(seq_len, device=x.device, dtype=torch.int32).expand(batch, -1)
        positions = (default if positions is None else positions).to(torch.int32).contiguous()
        document_ids = (torch.zeros_like(default) if document_ids is None
                        else document_ids.to(torch.int32)).contiguous()
    args = (x.contiguous(), w_qkv.contiguous(), w_o.contiguous(), router_weight, indices.contiguous(),
            scores.contiguous(), int(rotary_dim), float(rope_base), positions, document_ids, bool(deterministic),
            # chosen here, outside the op, so torch.compile bakes the path into the graph (and guards on it); the
            # wide path keeps the split path's Q|K|V
            _wide(indices.shape[-1], x.dtype) or _split_path(indices.shape[-1]))
    if torch.compiler.is_compiling():
        return _mosa_fwd_op(*args)[0]
    return _EagerMosaFunction.apply(*args)
