"""Fused Triton decode step of sparse heads: three launches instead of the reference's ~20 small kernels and copies.

At batch 1 a decode step is launch- and latency-bound (SPEC §6 inference numbers, benchmarks/decode*.md): every
kernel of a CUDA graph costs a few microseconds however little it does, and a kernel whose few programs each walk a
chain of dependent loads costs a microsecond per link. So:

  route kernel   one program (one warp) per row: the token's routing to at most J heads (`route_heads`): the heads
                 over their thresholds and, when more than J are, the J of largest margin (the J-th largest
                 found bit by bit, its ties by index); their slots in head order with joined flag and score; the
                 joins beyond J counted. Replaces a sort, gathers and sums.
  head kernel    one program per (row, head slot j): skip a head the token did not join; count a join into a full
                 head as capacity overflow; else project x through the head's W_Q|W_K|W_V in place (a GEMV whose
                 hidden chunks load all seven column segments at once, so their loads are in flight together),
                 rotate at `position`, append K, V to the head's cache, and attend over the head's held tokens with
                 an online softmax read straight from the cache. Writes score x attention [B, J, d] (fp32; zeros
                 for heads without a write) and the written flags.
  output kernel  one program per (row, hidden chunk): out = sum over the row's written heads of attended @
                 W_O[head], reducing over (head slot, dim) pairs in blocks of BLOCK_K rows of W_O gathered from
                 several heads at once (a fixed order: deterministic, no atomics).

That reads each joined head's weights once per (row, slot) pair: right when pairs rarely share a head (batch 1, or
the IsoFLOP model's 505 heads), wasteful when many do. At batch 32 the 4 + 17 model's 160 pairs fall on 17 heads,
so its head kernel read every head's 196 KB about nine times (14 us per layer on an H100). From
GROUPED_PAIRS_PER_HEAD pairs per head on (`grouped_decode`), the step is grouped by head instead:

  Q|K|V          one batched GEMM x @ W_QKV[e] for every head (cuBLAS; each head's weights read once), with an
                 fp32 output: in the inputs' 16-bit dtype cuBLAS may split the reduction over h and sum the
                 pieces in bf16 (2.6% output error at 505 heads, B=32 on an H200, session 7)
  head kernel    one program per (row, head): finds the head among the row's slots (none: writes zeros), rotates,
                 appends and attends as above, from the given Q|K|V; writes the dense [B, E, d] attended rows
  output kernel  attended[B, E*d] @ W_O[E*d, h], one program per (block of rows, hidden chunk), the attended rows
                 rounded to W_O's dtype and accumulated in fp32 (each head's W_O read once; no gather). Not a
                 cuBLAS GEMM: with E*d = 32,320 (505 heads) cuBLAS splits the reduction and, by torch's default,
                 sums the pieces in bf16 (2.7% output error on an H100 against 1e-2 allowed)

The layer step (`layer_decode`) runs a layer's dense heads and its MoSA heads (up to LAYER_DECODE_MAX_MOSA_HEADS)
together, after the dense heads' W_QKV GEMM:

  heads kernel   first one program per (row, MoSA head slot j < J): the row's router logits for all E heads (in
                 the inputs' dtype, as the router's nn.Linear returns them), the route kernel's choice of heads
                 (`_choose_heads`), then for the row's j-th chosen head, if it has room: project, rotate, append,
                 attend. Then one program per (row, dense head): rotate the given Q|K|V at `position`, write K, V at
                 that position of the dense cache (marking it real), attend over the real positions up to it,
                 DENSE_BLOCK_SLOTS at a time. The short MoSA programs go first, so they do not queue behind the
                 dense heads' walks (session 9: 0.79x -> 0.98x torch-mosa dense at B=32 for the 4 + 17 model).
                 Rows of attended [B, J + HD, d] in the output dtype, and each slot's head and written flag.
  output kernel  per (row, hidden chunk): the written MoSA slots' rows through their heads' W_O plus the dense
                 heads' rows through the dense W_O; dense heads alone: one cuBLAS GEMM.

Every attention takes the new token from registers, not from the cache it was just appended to: other threads of the
program stored it, and nothing orders those stores before the loads (session 9 found the 505-head grouped step's
output varying run to run).

Three launches per layer where the dense step (GEMM, RoPE, cache update, SDPA, GEMM) plus the sparse step (router
GEMV, route, heads, output, sum) took about ten: at B=1 a MoSA layer of a few heads costs what a dense layer costs
(docs/causal_inference.md, session 8).

All are torch.library custom ops, so the step stays capturable as a CUDA graph and traceable by torch.compile.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

BLOCK_H = 128  # hidden rows of W_QKV per step of the head kernel's GEMV
BLOCK_SLOTS = 32  # cache slots per step of the online softmax
# cache positions per step of a dense head's online softmax in the layer step: one program walks all positions up to
# the token's, a chain of dependent loads; at 32 per step the Tiny dense model's 392 positions took 19.6 us per layer
# at B=1 on an H200 (13 steps; cudnn's SDPA over the same cache: 7.3 us), so fewer, wider steps. 128 by
# benchmarks/experiments/layer_decode_block_slots.py (H200): 256 was 3% faster at B=1, 6% slower for dense at B=32
DENSE_BLOCK_SLOTS = 128
OUT_BLOCK_H = 32  # hidden columns per program of the output kernel (B * h / 32 programs: 16 per row at h 512)
OUT_BLOCK_K = 512  # (head slot, dim) rows of W_O per step of the output kernel's reduction
# (row, slot) pairs per head from which a step is grouped by head (module docstring). Measured on an H200 with the
# 4 + 17 model (benchmarks/experiments/decode_grouping.py, results/decode-grouping-h200-2026-11-23.log): grouped is
# 5% slower at B=8 (2.4 pairs per head) and 3% at B=16 (4.7), 2% faster at B=32 (9.4) and 4% at B=64 (18.8)
GROUPED_PAIRS_PER_HEAD = 8
GROUPED_OUT_BLOCK_H = 32  # hidden columns per program of the grouped output kernel (16 programs per 64 rows at h 512)
GROUPED_OUT_BLOCK_K = 64  # (head, dim) rows of W_O per step of its reduction


@triton.jit
def _choose_heads(logit, threshold, valid, J, ROUND_MARGIN: tl.constexpr, LT: tl.constexpr):
    """The heads of one row whose logit passes the threshold, at most J of them by largest margin (rounded to the
    logits' dtype LT when torch's logits - thresholds would be, as the reference computes it; equal margins to the
    lower index). Returns (chosen [BE] bool, number of heads above the threshold)."""
    above = valid & (logit > threshold)
    num_above = tl.sum(above.to(tl.int32), 0)
    chosen = above
    if num_above > J:  # keep the J largest margins: find the J-th largest key bit by bit, then break its ties
        margin = logit.to(tl.float32) - threshold.to(tl.float32)
        if ROUND_MARGIN:
            margin = margin.to(LT).to(tl.float32)
        bits = margin.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        key = tl.where(above, tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000), 0)
        kth = tl.zeros([], tl.int64)
        for bit in tl.static_range(31, -1, -1):
            candidate = kth | (1 << bit)
            kth = tl.where(tl.sum((key >= candidate).to(tl.int32), 0) >= J, candidate, kth)
        equal = above & (key == kth)
        need = J - tl.sum((key > kth).to(tl.int32), 0)
        chosen = (key > kth) | (equal & (tl.cumsum(equal.to(tl.int32), 0) <= need))
    return chosen, num_above


@triton.jit
def _route_heads_kernel(logits_ptr, thresholds_ptr, heads_ptr, joined_ptr, scores_ptr, overflow_ptr, E,
                        J: tl.constexpr, BE: tl.constexpr, ROUND_MARGIN: tl.constexpr):
    """One row, one warp (its reductions stay in shuffles): `_choose_heads`, the slots left over filled by the
    lowest other heads; written in head order, the joins beyond J counted."""
    b = tl.program_id(0).to(tl.int64)
    LT: tl.constexpr = logits_ptr.dtype.element_ty
    e = tl.arange(0, BE)
    valid = e < E
    logit = tl.load(logits_ptr + b * E + e, mask=valid, other=0.0)
    threshold = tl.load(thresholds_ptr + e, mask=valid, other=0.0)
    chosen, num_above = _choose_heads(logit, threshold, valid, J, ROUND_MARGIN, LT)
    if num_above > J:
        tl.atomic_add(overflow_ptr, (num_above - J).to(tl.int64))
    # fewer than J passed: the remaining slots take the lowest-index other heads, not joined
    others = valid & ~chosen
    filler = others & (tl.cumsum(others.to(tl.int32), 0) <= J - tl.sum(chosen.to(tl.int32), 0))
    taken = chosen | filler
    slot = b * J + tl.cumsum(taken.to(tl.int32), 0) - 1
    tl.store(heads_ptr + slot, e.to(tl.int64), mask=taken)
    tl.store(joined_ptr + slot, chosen, mask=taken)
    score = 1.0 / (1.0 + tl.exp(-logit.to(tl.float32)))
    tl.store(scores_ptr + slot, score.to(LT), mask=taken)


@triton.jit
def _sparse_decode_heads_kernel(x_ptr, qkv_ptr, heads_ptr, joined_ptr, scores_ptr, pos_ptr, w_qkv_ptr, k_ptr,
                                v_ptr, counts_ptr, overflow_ptr, attended_ptr, written_ptr, B, E, J, log2_base,
                                H: tl.constexpr, D: tl.constexpr, R2: tl.constexpr, CAP: tl.constexpr,
                                BR: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                                BS: tl.constexpr, BJ: tl.constexpr, ALL_HEADS: tl.constexpr,
                                GROUPED: tl.constexpr, SLOTS_BOUND: tl.constexpr):
    """Per pair (GROUPED off): program pid = (row b, slot j), projects x itself and writes attended[b, j] and
    written[b, j]. GROUPED: program pid = (row b, head e), reads the head's projections from qkv [E, B, 3D], finds e
    among the row's J slots and writes attended[b, e] (zeros for a head the row did not write)."""
    pid = tl.program_id(0)
    if GROUPED:
        b = pid // E
        e = (pid % E).to(tl.int64)
        if ALL_HEADS:
            slot = pid
            found = True
        else:
            js = tl.arange(0, BJ)
            row_heads = tl.load(heads_ptr + b * J + js, mask=js < J, other=-1)
            match = row_heads == e
            found = tl.sum(match.to(tl.int32), 0) > 0
            slot = b * J + tl.sum(tl.where(match, js, 0), 0)
    else:
        b = pid // J
        slot = pid
        found = True
        if ALL_HEADS:
            e = (pid % J).to(tl.int64)
        else:
            e = tl.load(heads_ptr + pid).to(tl.int64)
    joined = found & (tl.load(joined_ptr + slot) != 0)
    head = b.to(tl.int64) * E + e
    count, written = _head_room(joined, counts_ptr + head, overflow_ptr, CAP)
    P: tl.constexpr = D - 2 * R2
    r = tl.arange(0, BR)
    p = tl.arange(0, BP)
    d = tl.arange(0, BD)
    rm = r < R2
    pm = p < P
    dm = d < D
    out = tl.zeros([BD], tl.float32)
    if written:
        if GROUPED:
            q1, q2, q3, k1, k2, k3, v = _given_qkv(qkv_ptr + (e * B + b) * 3 * D, r, p, d, rm, pm, dm, D, R2)
        else:
            q1, q2, q3, k1, k2, k3, v = _project_token_qkv(x_ptr + b.to(tl.int64) * H, w_qkv_ptr + e * H * 3 * D,
                                                           r, p, d, rm, pm, dm, H, D, R2, BR, BP, BD, BH)
        out = _join_head(q1, q2, q3, k1, k2, k3, v, head, count, counts_ptr, k_ptr, v_ptr, pos_ptr, log2_base, r, p, d,
                         rm, pm, dm, D, R2, CAP, BD, BS, SLOTS_BOUND)
        out = out * tl.load(scores_ptr + slot).to(tl.float32)
    tl.store(attended_ptr + pid.to(tl.int64) * D + d, out.to(attended_ptr.dtype.element_ty), mask=dm)
    if not GROUPED:
        tl.store(written_ptr + pid, written.to(tl.int8))


@triton.jit
def _project_token_qkv(x_row, w_e, r, p, d, rm, pm, dm, H: tl.constexpr, D: tl.constexpr, R2: tl.constexpr,
                       BR: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
    """x_row [H] @ w_e [H, 3D] in fp32 -> Q, K as (rotated half 1, rotated half 2, pass-through) segments, as the
    training kernels hold them, and V."""
    # One pass over the hidden rows loads all seven segments of a chunk together, and the products gather in
    # [BH, width] accumulators, summed over the hidden rows once after the loop: a sum across warps inside
    # the loop would cost a shared-memory round trip per segment and chunk
    q1 = tl.zeros([BH, BR], tl.float32)
    q2 = tl.zeros([BH, BR], tl.float32)
    q3 = tl.zeros([BH, BP], tl.float32)
    k1 = tl.zeros([BH, BR], tl.float32)
    k2 = tl.zeros([BH, BR], tl.float32)
    k3 = tl.zeros([BH, BP], tl.float32)
    v = tl.zeros([BH, BD], tl.float32)
    for h0 in range(0, H, BH):
        hs = h0 + tl.arange(0, BH)
        hm = hs < H
        xs = tl.load(x_row + hs, mask=hm, other=0.0).to(tl.float32)[:, None]
        rows = w_e + hs[:, None] * (3 * D)
        hr = hm[:, None] & rm[None, :]
        hp = hm[:, None] & pm[None, :]
        q1 += xs * tl.load(rows + r[None, :], mask=hr, other=0.0).to(tl.float32)
        q2 += xs * tl.load(rows + R2 + r[None, :], mask=hr, other=0.0).to(tl.float32)
        q3 += xs * tl.load(rows + 2 * R2 + p[None, :], mask=hp, other=0.0).to(tl.float32)
        k1 += xs * tl.load(rows + D + r[None, :], mask=hr, other=0.0).to(tl.float32)
        k2 += xs * tl.load(rows + D + R2 + r[None, :], mask=hr, other=0.0).to(tl.float32)
        k3 += xs * tl.load(rows + D + 2 * R2 + p[None, :], mask=hp, other=0.0).to(tl.float32)
        v += xs * tl.load(rows + 2 * D + d[None, :], mask=hm[:, None] & dm[None, :], other=0.0).to(tl.float32)
    q1 = tl.sum(q1, 0)
    q2 = tl.sum(q2, 0)
    q3 = tl.sum(q3, 0)
    k1 = tl.sum(k1, 0)
    k2 = tl.sum(k2, 0)
    k3 = tl.sum(k3, 0)
    v = tl.sum(v, 0)
    return q1, q2, q3, k1, k2, k3, v


@triton.jit
def _given_qkv(row, r, p, d, rm, pm, dm, D: tl.constexpr, R2: tl.constexpr):
    """One head's projections of one token, read from row [3D] (Q|K|V), in fp32 as `_project_token_qkv` returns
    them."""
    q1 = tl.load(row + r, mask=rm, other=0.0).to(tl.float32)
    q2 = tl.load(row + R2 + r, mask=rm, other=0.0).to(tl.float32)
    q3 = tl.load(row + 2 * R2 + p, mask=pm, other=0.0).to(tl.float32)
    k1 = tl.load(row + D + r, mask=rm, other=0.0).to(tl.float32)
    k2 = tl.load(row + D + R2 + r, mask=rm, other=0.0).to(tl.float32)
    k3 = tl.load(row + D + 2 * R2 + p, mask=pm, other=0.0).to(tl.float32)
    v = tl.load(row + 2 * D + d, mask=dm, other=0.0).to(tl.float32)
    return q1, q2, q3, k1, k2, k3, v


@triton.jit
def _head_room(joined, count_ptr, overflow_ptr, CAP: tl.constexpr):
    """A sparse head's token count and whether the token is written into it: it joined and the head has room; a
    join into a full head is counted in overflow_ptr. -> (count, written)."""
    count = tl.load(count_ptr)
    written = joined & (count < CAP)
    if joined & (count >= CAP):
        tl.atomic_add(overflow_ptr, 1)
    return count, written


@triton.jit
def _join_head(q1, q2, q3, k1, k2, k3, v, head, count, counts_ptr, k_ptr, v_ptr, pos_ptr, log2_base, r, p, d, rm, pm,
               dm, D: tl.constexpr, R2: tl.constexpr, CAP: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
               SLOTS_BOUND: tl.constexpr):
    """A written token in sparse head `head` (of a [.., CAP + 1, D] cache holding `count` tokens): rotate at
    `position`, append K, V at the head's next slot, count it, and attend over the `count` held tokens and itself.
    -> the attention output [BD] in fp32."""
    q1, q2, k1, k2 = _rotate(q1, q2, k1, k2, pos_ptr, log2_base, r, R2)
    _append(k_ptr, v_ptr, (head * (CAP + 1) + count) * D, k1, k2, k3, v, r, p, d, rm, pm, dm, R2)
    tl.store(counts_ptr + head, count + 1)
    return _attend_cache(k_ptr, v_ptr, head * (CAP + 1) * D, count, q1, q2, q3, k1, k2, k3, v, r, p, d, rm, pm, dm,
                         k_ptr, D, R2, BD, BS, SLOTS_BOUND, False)


@triton.jit
def _rotate(q1, q2, k1, k2, pos_ptr, log2_base, r, R2: tl.constexpr):
    """RoPE at `position` on the rotated halves of q and k: the reference's fp32 angles position * base^(-2i /
    rotary_dim)."""
    if R2 > 0:
        position = tl.load(pos_ptr).to(tl.float32)
        angle = position * tl.exp2(-(2.0 * r.to(tl.float32) / (2 * R2)) * log2_base)
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        q1, q2 = q1 * cos - q2 * sin, q2 * cos + q1 * sin
        k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
    return q1, q2, k1, k2


@triton.jit
def _append(k_ptr, v_ptr, cache_row, k1, k2, k3, v, r, p, d, rm, pm, dm, R2: tl.constexpr):
    """Store one token's K (as its three segments) and V at element offset cache_row of the caches."""
    KT: tl.constexpr = k_ptr.dtype.element_ty
    tl.store(k_ptr + cache_row + r, k1.to(KT), mask=rm)
    tl.store(k_ptr + cache_row + R2 + r, k2.to(KT), mask=rm)
    tl.store(k_ptr + cache_row + 2 * R2 + p, k3.to(KT), mask=pm)
    tl.store(v_ptr + cache_row + d, v.to(KT), mask=dm)


@triton.jit
def _attend_cache(k_ptr, v_ptr, head_cache, held, q1, q2, q3, k1, k2, k3, v, r, p, d, rm, pm, dm, real_row,
                  D: tl.constexpr, R2: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, SLOTS_BOUND: tl.constexpr,
                  HAS_REAL: tl.constexpr):
    """softmax(q . K / sqrt(d)) V over slots 0..held-1 of one head's cache (from element offset head_cache) and the
    new token (k1, k2, k3, v, just appended at slot `held`): an online softmax in fp32 over blocks of BS slots, then
    the new token. q, k and v are rounded to the cache's dtype first, as the reference's attention sees them.
    HAS_REAL: only slots marked in real_row [slots] count (the new token always does).

    The new token is taken from registers, not read back from the cache: other threads of this program stored it,
    and nothing orders their global stores before these loads (a race; session 9 found the 505-head grouped step's
    output varying run to run with fixed inputs)."""
    KT: tl.constexpr = k_ptr.dtype.element_ty
    q1 = q1.to(KT).to(tl.float32)
    q2 = q2.to(KT).to(tl.float32)
    q3 = q3.to(KT).to(tl.float32)
    scale = 1.0 / tl.sqrt(D * 1.0)
    # a finite floor, not -inf: a first block with no real slot (left padding longer than BS) must leave the state
    # empty, where -inf - -inf would make it NaN
    m_i = tl.full((), -1.0e30, tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc = tl.zeros([BD], tl.float32)
    if SLOTS_BOUND > 0:  # the interpreter cannot loop to a run-time bound
        for s0 in range(0, SLOTS_BOUND, BS):
            m_i, l_i, acc = _attend_slots(k_ptr, v_ptr, head_cache, s0, held, q1, q2, q3, r, p, d, rm, pm, dm,
                                          scale, m_i, l_i, acc, real_row, D, R2, BS, HAS_REAL)
    else:
        for s0 in range(0, held, BS):
            m_i, l_i, acc = _attend_slots(k_ptr, v_ptr, head_cache, s0, held, q1, q2, q3, r, p, d, rm, pm, dm,
                                          scale, m_i, l_i, acc, real_row, D, R2, BS, HAS_REAL)
    s_new = (tl.sum(q1 * k1.to(KT).to(tl.float32), 0) + tl.sum(q2 * k2.to(KT).to(tl.float32), 0)
             + tl.sum(q3 * k3.to(KT).to(tl.float32), 0)) * scale
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp(m_i - m_new)
    w = tl.exp(s_new - m_new)
    acc = acc * alpha + w * v.to(KT).to(tl.float32)
    return acc / (l_i * alpha + w)


@triton.jit
def _attend_slots(k_ptr, v_ptr, head_cache, s0, held, q1, q2, q3, r, p, d, rm, pm, dm, scale, m_i, l_i, acc,
                  real_row, D: tl.constexpr, R2: tl.constexpr, BS: tl.constexpr, HAS_REAL: tl.constexpr):
    """One block of BS cache slots (those below `held`, and real with HAS_REAL) into the online softmax (m_i, l_i,
    acc)."""
    slots = s0 + tl.arange(0, BS)
    sm = slots < held
    if HAS_REAL:
        sm = sm & (tl.load(real_row + slots, mask=sm, other=0) != 0)
    rows = head_cache + slots.to(tl.int64)[:, None] * D
    k1 = tl.load(k_ptr + rows + r[None, :], mask=sm[:, None] & rm[None, :], other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + rows + R2 + r[None, :], mask=sm[:, None] & rm[None, :], other=0.0).to(tl.float32)
    k3 = tl.load(k_ptr + rows + 2 * R2 + p[None, :], mask=sm[:, None] & pm[None, :], other=0.0).to(tl.float32)
    s = tl.sum(k1 * q1[None, :], 1) + tl.sum(k2 * q2[None, :], 1) + tl.sum(k3 * q3[None, :], 1)
    s = tl.where(sm, s * scale, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    alpha = tl.exp(m_i - m_new)
    w = tl.exp(s - m_new)
    v = tl.load(v_ptr + rows + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0).to(tl.float32)
    acc = acc * alpha + tl.sum(w[:, None] * v, 0)
    l_i = l_i * alpha + tl.sum(w, 0)
    return m_new, l_i, acc


@triton.jit
def _decode_output_kernel(attended_ptr, written_ptr, heads_ptr, w_o_ptr, dense_w_o_ptr, out_ptr, J: tl.constexpr,
                          H: tl.constexpr, D: tl.constexpr, KD: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
                          ALL_HEADS: tl.constexpr):
    """out[b, chunk] = the sum over (head slot j, dim i) of attended[b, j*D + i] * W_O[head j][i, chunk] (the J*D
    pairs in blocks of BK, each block gathering the W_O rows of several heads, skipped for heads without a write) +
    attended[b, J*D:] @ dense W_O (the dense heads' KD = heads x d rows after the slots, none when KD = 0)."""
    num_chunks = tl.cdiv(H, BH)
    b = (tl.program_id(0) // num_chunks).to(tl.int64)
    hs = (tl.program_id(0) % num_chunks) * BH + tl.arange(0, BH)
    hm = hs < H
    row = attended_ptr + b * (J * D + KD)
    acc = tl.zeros([BK, BH], tl.float32)  # summed over its rows once, after the loop
    for k0 in range(0, J * D, BK):
        k = k0 + tl.arange(0, BK)
        slot = b * J + k // D
        i = k % D
        live = (k < J * D) & (tl.load(written_ptr + slot, mask=k < J * D, other=0) != 0)
        if ALL_HEADS:
            e = (k // D).to(tl.int64)
        else:
            e = tl.load(heads_ptr + slot, mask=live, other=0).to(tl.int64)
        a = tl.load(row + k, mask=live, other=0.0)
        w = tl.load(w_o_ptr + (e * D + i)[:, None] * H + hs[None, :], mask=live[:, None] & hm[None, :], other=0.0)
        acc += a[:, None] * w.to(tl.float32)
    for k0 in range(0, KD, BK):  # dense heads, W_O as nn.Linear holds it: [H, KD]
        k = k0 + tl.arange(0, BK)
        live = k < KD
        a = tl.load(row + J * D + k, mask=live, other=0.0)
        w = tl.load(dense_w_o_ptr + hs[None, :] * KD + k[:, None], mask=live[:, None] & hm[None, :], other=0.0)
        acc += a[:, None] * w.to(tl.float32)
    tl.store(out_ptr + b * H + hs, tl.sum(acc, 0).to(out_ptr.dtype.element_ty), mask=hm)


@triton.jit
def _layer_decode_heads_kernel(x_ptr, dense_qkv_ptr, dense_k_ptr, dense_v_ptr, real_ptr, router_ptr, thresholds_ptr,
                               w_qkv_ptr, k_ptr, v_ptr, counts_ptr, capacity_overflow_ptr, token_overflow_ptr,
                               pos_ptr, attended_ptr, heads_ptr, written_ptr, B, E, log2_base, J: tl.constexpr,
                               HD: tl.constexpr, L: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                               R2: tl.constexpr, CAP: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
                               BD: tl.constexpr, BH: tl.constexpr, BS: tl.constexpr, BSD: tl.constexpr,
                               BE: tl.constexpr, MOSA: tl.constexpr,
                               MARK_REAL: tl.constexpr, ROUND_MARGIN: tl.constexpr, INTERPRET: tl.constexpr):
    """A layer's dense and MoSA heads in one launch (module docstring, "the layer step"). The first programs (MOSA)
    route a row (all E router logits, `_choose_heads`) and run its j-th joined head, if any: room check, project,
    append, attend; one program per (row b, slot j < J). (One program per row taking its J slots in turn was slower
    at every batch: 0.88x against 0.98x torch-mosa dense at B=32, benchmarks/results/layer-decode-batches-h200-
    2026-11-24-0321.log.)
    The others: dense head (b, hd) from its given Q|K|V. Each writes rows of attended [B, J + HD, D] (MoSA slots
    first, times the score, zeros without a write); MoSA slots also their head in heads [B, J] and whether they
    wrote in written [B, J].

    The short MoSA programs come first: blocks start in program order, and behind the long dense walks they would
    queue for the few SMs left free (at B=32 the 4 + 17 model's 544 per-head MoSA programs queued behind 128 dense
    ones: 0.79x torch-mosa dense, results/layer-decode-batches-h200-2026-11-24-0255.log)."""
    pid = tl.program_id(0)
    P: tl.constexpr = D - 2 * R2
    r = tl.arange(0, BR)
    p = tl.arange(0, BP)
    d = tl.arange(0, BD)
    rm = r < R2
    pm = p < P
    dm = d < D
    mosa_programs = B * J  # J = 0 without MoSA heads
    row_stride = (J + HD) * D
    # an absent part (HD = 0, or MOSA off) is compiled out: its tensors are placeholders
    if pid < mosa_programs:
        if MOSA:
            b = (pid // J).to(tl.int64)
            x_row = x_ptr + b * H
            LT: tl.constexpr = x_ptr.dtype.element_ty
            es = tl.arange(0, BE)
            em = es < E
            # the row's router logits, in the inputs' dtype as the router's Linear returns them
            products = tl.zeros([BE, BH], tl.float32)
            for h0 in range(0, H, BH):
                hs = h0 + tl.arange(0, BH)
                hm = hs < H
                xs = tl.load(x_row + hs, mask=hm, other=0.0).to(tl.float32)
                w = tl.load(router_ptr + es[:, None] * H + hs[None, :], mask=em[:, None] & hm[None, :], other=0.0)
                products += w.to(tl.float32) * xs[None, :]
            logit = tl.sum(products, 1).to(LT)
            threshold = tl.load(thresholds_ptr + es, mask=em, other=0.0)
            chosen, num_above = _choose_heads(logit, threshold, em, J, ROUND_MARGIN, LT)
            rank = tl.cumsum(chosen.to(tl.int32), 0)  # a chosen head's 1-based place among the row's chosen
            j = pid % J
            if num_above > J:  # the joins beyond the limit, counted once per row
                if j == 0:
                    tl.atomic_add(token_overflow_ptr, (num_above - J).to(tl.int64))
            _layer_mosa_slot(x_row, b, j, logit, chosen, rank, es, w_qkv_ptr, k_ptr, v_ptr, counts_ptr,
                             capacity_overflow_ptr, pos_ptr, attended_ptr + b * row_stride, heads_ptr, written_ptr,
                             E, log2_base, J, H, D, R2, CAP, BR, BP, BD, BH, BS, LT, INTERPRET)
    else:
        if HD > 0:
            dense_pid = pid - mosa_programs
            b = (dense_pid // HD).to(tl.int64)
            hd = dense_pid % HD
            head = b * HD + hd
            q1, q2, q3, k1, k2, k3, v = _given_qkv(dense_qkv_ptr + head * 3 * D, r, p, d, rm, pm, dm, D, R2)
            q1, q2, k1, k2 = _rotate(q1, q2, k1, k2, pos_ptr, log2_base, r, R2)
            position = tl.load(pos_ptr)
            _append(dense_k_ptr, dense_v_ptr, (head * L + position) * D, k1, k2, k3, v, r, p, d, rm, pm, dm, R2)
            if MARK_REAL:
                if hd == 0:
                    tl.store(real_ptr + b * L + position, 1)
            # the real positions before this one (left padding is not real), then the new token
            out = _attend_cache(dense_k_ptr, dense_v_ptr, head * L * D, position, q1, q2, q3, k1, k2, k3, v, r, p, d,
                                rm, pm, dm, real_ptr + b * L, D, R2, BD, BSD, L if INTERPRET else 0, True)
            tl.store(attended_ptr + b * row_stride + (J + hd) * D + d, out.to(attended_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _layer_mosa_slot(x_row, b, j, logit, chosen, rank, es, w_qkv_ptr, k_ptr, v_ptr, counts_ptr, capacity_overflow_ptr,
                     pos_ptr, attended_row, heads_ptr, written_ptr, E, log2_base, J: tl.constexpr, H: tl.constexpr,
                     D: tl.constexpr, R2: tl.constexpr, CAP: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
                     BD: tl.constexpr, BH: tl.constexpr, BS: tl.constexpr, LT: tl.constexpr,
                     INTERPRET: tl.constexpr):
    """MoSA slot j of row b in the layer step: the row's (j+1)-th chosen head in head order, if any, joins the token
    (room check, project, rotate, append, attend, times its score); writes the slot's attended row (zeros without a
    write), its head and its written flag."""
    P: tl.constexpr = D - 2 * R2
    r = tl.arange(0, BR)
    p = tl.arange(0, BP)
    d = tl.arange(0, BD)
    rm = r < R2
    pm = p < P
    dm = d < D
    mine = chosen & (rank == j + 1)
    joined = tl.sum(mine.to(tl.int32), 0) > 0
    e = tl.sum(tl.where(mine, es, 0), 0).to(tl.int64)
    head = b * E + e
    count, written = _head_room(joined, counts_ptr + head, capacity_overflow_ptr, CAP)
    out = tl.zeros([BD], tl.float32)
    if written:
        q1, q2, q3, k1, k2, k3, v = _project_token_qkv(x_row, w_qkv_ptr + e * H * 3 * D, r, p, d, rm, pm, dm, H, D, R2,
                                                       BR, BP, BD, BH)
        out = _join_head(q1, q2, q3, k1, k2, k3, v, head, count, counts_ptr, k_ptr, v_ptr, pos_ptr, log2_base, r, p, d,
                         rm, pm, dm, D, R2, CAP, BD, BS, CAP + 1 if INTERPRET else 0)
        logit_e = tl.sum(tl.where(mine, logit.to(tl.float32), 0.0), 0)
        out = out * (1.0 / (1.0 + tl.exp(-logit_e))).to(LT).to(tl.float32)
    tl.store(attended_row + j * D + d, out.to(attended_row.dtype.element_ty), mask=dm)
    tl.store(heads_ptr + b * J + j, e)
    tl.store(written_ptr + b * J + j, written.to(tl.int8))


@triton.jit
def _grouped_output_kernel(attended_ptr, w_o_ptr, out_ptr, B, K: tl.constexpr, H: tl.constexpr, BM: tl.constexpr,
                           BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """out[rows, chunk] = attended[rows, :K] @ W_O[:K, chunk] with K = E * d, in fp32."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_mask = rows < B
    col_mask = cols < H
    WT: tl.constexpr = w_o_ptr.dtype.element_ty
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < K
        a = tl.load(attended_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=row_mask[:, None] & km[None, :],
                    other=0.0)
        w = tl.load(w_o_ptr + ks.to(tl.int64)[:, None] * H + cols[None, :], mask=km[:, None] & col_mask[None, :],
                    other=0.0)
        acc = tl.dot(a.to(WT), w, acc, input_precision=PREC)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _all_heads_qkv(x: torch.Tensor, w_qkv: torch.Tensor) -> torch.Tensor:
    """x [B, h] @ w_qkv[e] for every head -> [E, B, 3d] in fp32 (module docstring: why fp32)."""
    if x.dtype == torch.float32:
        return torch.matmul(x, w_qkv)
    if x.is_cuda:
        return torch.bmm(x.expand(w_qkv.shape[0], -1, -1), w_qkv, out_dtype=torch.float32)
    return torch.matmul(x.float(), w_qkv.float())  # the interpreter's CPU tensors (bmm's out_dtype is CUDA-only)


def grouped_decode(batch: int, width: int, num_heads: int) -> bool:
    """Whether a step of `batch` rows over `width` head slots each is grouped by head (module docstring)."""
    return batch * width >= GROUPED_PAIRS_PER_HEAD * num_heads


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.library.custom_op("torch_mosa::sparse_decode", mutates_args=("cache_k", "cache_v", "counts",
                                                                    "capacity_overflow"))
def sparse_decode_triton(x: torch.Tensor, heads: torch.Tensor | None, joined: torch.Tensor, scores: torch.Tensor,
                         position: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor, cache_k: torch.Tensor,
                         cache_v: torch.Tensor, counts: torch.Tensor, capacity_overflow: torch.Tensor,
                         rotary_dim: int, rope_base: float) -> torch.Tensor:
    """The fused decode step (module docstring); arguments as `torch_mosa.ops.decode.sparse_decode`, contiguous."""
    batch, hidden = x.shape
    num_heads, _, three_d = w_qkv.shape
    head_dim = three_d // 3
    capacity = cache_k.shape[2] - 1
    width = num_heads if heads is None else heads.shape[1]
    grouped = grouped_decode(batch, width, num_heads)
    # grouped: every head's Q|K|V from one batched GEMM, the attended rows dense over the heads
    qkv = _all_heads_qkv(x, w_qkv) if grouped else None  # [E, B, 3d] fp32
    attended = torch.empty(batch, num_heads if grouped else width, head_dim, device=x.device, dtype=torch.float32)
    written = None if grouped else torch.empty(batch, width, device=x.device, dtype=torch.int8)
    _sparse_decode_heads_kernel[(batch * (num_heads if grouped else width),)](
        x, qkv, joined if heads is None else heads, joined, scores, position, w_qkv, cache_k, cache_v, counts,
        capacity_overflow, attended, written, batch, num_heads, width, math.log2(rope_base),
        H=hidden, D=head_dim, R2=rotary_dim // 2, CAP=capacity, BR=_block(rotary_dim // 2),
        BP=_block(head_dim - rotary_dim), BD=_block(head_dim), BH=BLOCK_H, BS=BLOCK_SLOTS, BJ=_block(width),
        ALL_HEADS=heads is None, GROUPED=grouped, SLOTS_BOUND=capacity + 1 if _interpreting() else 0, num_warps=8)
    out = torch.empty(batch, hidden, device=x.device, dtype=x.dtype)
    if grouped:
        block_m = min(64, _block(batch))
        _grouped_output_kernel[(triton.cdiv(batch, block_m), triton.cdiv(hidden, GROUPED_OUT_BLOCK_H))](
            attended, w_o, out, batch, K=num_heads * head_dim, H=hidden, BM=block_m, BN=GROUPED_OUT_BLOCK_H,
            BK=GROUPED_OUT_BLOCK_K, PREC="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4)
        return out
    _decode_output_kernel[(batch * triton.cdiv(hidden, OUT_BLOCK_H),)](
        attended, written, joined if heads is None else heads, w_o, w_o, out, J=width, H=hidden, D=head_dim, KD=0,
        BK=OUT_BLOCK_K, BH=OUT_BLOCK_H, ALL_HEADS=heads is None, num_warps=8)
    return out


@sparse_decode_triton.register_fake
def _sparse_decode_fake(x, heads, joined, scores, position, w_qkv, w_o, cache_k, cache_v, counts, capacity_overflow,
                        rotary_dim, rope_base):
    return x.new_empty(x.shape)


@torch.library.custom_op("torch_mosa::layer_decode", mutates_args=(
    "dense_k", "dense_v", "key_real", "cache_k", "cache_v", "counts", "capacity_overflow", "token_overflow"))
def layer_decode_triton(x: torch.Tensor, position: torch.Tensor, dense_qkv: torch.Tensor | None,
                        dense_w_o: torch.Tensor | None, dense_k: torch.Tensor | None, dense_v: torch.Tensor | None,
                        key_real: torch.Tensor | None, mark_real: bool, router_weight: torch.Tensor | None,
                        thresholds: torch.Tensor | None, w_qkv: torch.Tensor | None, w_o: torch.Tensor | None,
                        cache_k: torch.Tensor | None, cache_v: torch.Tensor | None, counts: torch.Tensor | None,
                        capacity_overflow: torch.Tensor | None, token_overflow: torch.Tensor | None,
                        heads_per_token: int, rotary_dim: int, rope_base: float) -> torch.Tensor:
    """The layer step (module docstring); arguments as `torch_mosa.ops.decode.layer_decode` unpacks them,
    contiguous. A part that is absent has all its tensors None."""
    batch, hidden = x.shape
    dense = dense_qkv is not None
    mosa = router_weight is not None
    dense_heads, max_len, head_dim = (dense_k.shape[1], dense_k.shape[2], dense_k.shape[3]) if dense else (0, 1, 0)
    num_heads, capacity = (cache_k.shape[1], cache_k.shape[2] - 1) if mosa else (0, 0)
    if mosa:
        head_dim = cache_k.shape[3]
    out_dtype = dense_qkv.dtype if dense else x.dtype
    slots = heads_per_token if mosa else 0  # MoSA slots per row: the J heads a token may join
    # attended rows (MoSA slots, then dense heads) in the output's dtype, as SDPA returns them (so a dense-only step's
    # output is one cuBLAS GEMM)
    attended = torch.empty(batch, slots + dense_heads, head_dim, device=x.device, dtype=out_dtype)
    heads = torch.empty(batch, slots, device=x.device, dtype=torch.long)
    written = torch.empty(batch, slots, device=x.device, dtype=torch.int8)
    round_margin = mosa and x.dtype != torch.float32 and \
        torch.promote_types(x.dtype, thresholds.dtype) == x.dtype  # as route_heads_triton
    # an absent part's tensors: placeholders of their dtypes (its code is compiled out)
    floats, longs = attended.new_empty(1), torch.empty(1, dtype=torch.long, device=x.device)
    bools = torch.empty(1, dtype=torch.bool, device=x.device)
    dense_args = (dense_qkv, dense_k, dense_v, key_real) if dense else (floats, floats, floats, bools)
    mosa_args = (router_weight, thresholds, w_qkv, cache_k, cache_v, counts, capacity_overflow, token_overflow) \
        if mosa else (floats, floats, floats, floats, floats, longs, longs, longs)
    _layer_decode_heads_kernel[(batch * slots + batch * dense_heads,)](
        x, *dense_args, *mosa_args,
        position, attended, heads, written, batch, num_heads, math.log2(rope_base), J=slots,
        HD=dense_heads, L=max_len, H=hidden, D=head_dim, R2=rotary_dim // 2, CAP=capacity,
        BR=_block(rotary_dim // 2), BP=_block(head_dim - rotary_dim), BD=_block(head_dim), BH=BLOCK_H,
        BS=BLOCK_SLOTS, BSD=DENSE_BLOCK_SLOTS, BE=_block(num_heads), MOSA=mosa, MARK_REAL=dense and mark_real,
        ROUND_MARGIN=round_margin, INTERPRET=_interpreting(), num_warps=8)
    if not mosa:  # dense heads alone: attended [B, H*d] @ W_O^T, as the SDPA step computes it
        return torch.nn.functional.linear(attended.view(batch, -1), dense_w_o.to(out_dtype))
    out = torch.empty(batch, hidden, device=x.device, dtype=out_dtype)
    _decode_output_kernel[(batch * triton.cdiv(hidden, OUT_BLOCK_H),)](
        attended, written, heads, w_o, dense_w_o if dense else floats, out,
        J=slots, H=hidden, D=head_dim, KD=dense_heads * head_dim, BK=OUT_BLOCK_K, BH=OUT_BLOCK_H,
        ALL_HEADS=False, num_warps=8)
    return out


@layer_decode_triton.register_fake
def _layer_decode_fake(x, position, dense_qkv, *args):
    return x.new_empty(x.shape, dtype=x.dtype if dense_qkv is None else dense_qkv.dtype)


@torch.library.custom_op("torch_mosa::route_heads", mutates_args=("token_overflow",))
def route_heads_triton(logits: torch.Tensor, thresholds: torch.Tensor, token_overflow: torch.Tensor,
                       heads_per_token: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The route kernel (module docstring); arguments as `torch_mosa.ops.decode.route_heads`, contiguous."""
    batch, num_heads = logits.shape
    heads = torch.empty(batch, heads_per_token, device=logits.device, dtype=torch.long)
    joined = torch.empty(batch, heads_per_token, device=logits.device, dtype=torch.bool)
    scores = torch.empty(batch, heads_per_token, device=logits.device, dtype=logits.dtype)
    # torch computes logits - thresholds in their promoted dtype: the margins tie as they do there
    round_margin = logits.dtype != torch.float32 and torch.promote_types(logits.dtype, thresholds.dtype) == logits.dtype
    _route_heads_kernel[(batch,)](logits, thresholds, heads, joined, scores, token_overflow, num_heads,
                                  J=heads_per_token, BE=_block(num_heads), ROUND_MARGIN=round_margin, num_warps=1)
    return heads, joined, scores


@route_heads_triton.register_fake
def _route_heads_fake(logits, thresholds, token_overflow, heads_per_token):
    shape = (logits.shape[0], heads_per_token)
    return (logits.new_empty(shape, dtype=torch.long), logits.new_empty(shape, dtype=torch.bool),
            logits.new_empty(shape))
