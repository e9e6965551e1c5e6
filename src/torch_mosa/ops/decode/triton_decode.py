"""Fused Triton decode step of sparse heads: two launches instead of the reference's ~15 small kernels and copies.

At batch 1 a decode step is launch-bound (SPEC §6 inference numbers, benchmarks/decode*.md): the reference
composition gathers each joined head's weights (w_qkv[heads], w_o[heads]) and cache rows (k[rows, heads]) into
copies, then runs a dozen small kernels for the projection, RoPE, the cache append, the mask and attention. Here:

  head kernel    one program per (row, head slot j): skip a head the token did not join; count a join into a full
                 head as capacity overflow; else project x through the head's W_Q|W_K|W_V in place (a GEMV over
                 hidden chunks, no weight copy), rotate at `position`, append K, V to the head's cache, and attend
                 over the head's held tokens with an online softmax read straight from the cache. Writes
                 score x attention [B, J, d] (fp32; zeros for heads without a write) and the written flags.
  output kernel  one program per (row, hidden chunk): out = sum over the row's written heads of
                 attended @ W_O[head], in head order (deterministic, no atomics).

Both are torch.library custom ops, so the step stays capturable as a CUDA graph and traceable by torch.compile.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

BLOCK_H = 64
BLOCK_SLOTS = 32


@triton.jit
def _gemv_segment(x_ptr, w_e, cols, col_mask, H: tl.constexpr, THREE_D: tl.constexpr, BH: tl.constexpr,
                  WIDTH: tl.constexpr):
    """x [H] @ W_e[:, cols] -> [WIDTH] fp32 (W_e a [H, 3d] row-major head weight)."""
    acc = tl.zeros([WIDTH], tl.float32)
    for h0 in range(0, H, BH):
        hs = h0 + tl.arange(0, BH)
        hm = hs < H
        xs = tl.load(x_ptr + hs, mask=hm, other=0.0).to(tl.float32)
        w = tl.load(w_e + hs[:, None] * THREE_D + cols[None, :], mask=hm[:, None] & col_mask[None, :], other=0.0)
        acc += tl.sum(xs[:, None] * w.to(tl.float32), 0)
    return acc


@triton.jit
def _sparse_decode_heads_kernel(x_ptr, heads_ptr, joined_ptr, scores_ptr, pos_ptr, w_qkv_ptr, k_ptr, v_ptr,
                                counts_ptr, overflow_ptr, attended_ptr, written_ptr, E, J, log2_base,
                                H: tl.constexpr, D: tl.constexpr, R2: tl.constexpr, CAP: tl.constexpr,
                                BR: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                                BS: tl.constexpr, ALL_HEADS: tl.constexpr, SLOTS_BOUND: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // J
    j = pid % J
    if ALL_HEADS:
        e = j.to(tl.int64)
    else:
        e = tl.load(heads_ptr + pid).to(tl.int64)
    joined = tl.load(joined_ptr + pid) != 0
    head = b.to(tl.int64) * E + e
    count = tl.load(counts_ptr + head)
    written = joined & (count < CAP)
    if joined & (count >= CAP):
        tl.atomic_add(overflow_ptr, 1)
    P: tl.constexpr = D - 2 * R2
    r = tl.arange(0, BR)
    p = tl.arange(0, BP)
    d = tl.arange(0, BD)
    rm = r < R2
    pm = p < P
    dm = d < D
    out = tl.zeros([BD], tl.float32)
    if written:
        x_row = x_ptr + b.to(tl.int64) * H
        w_e = w_qkv_ptr + e * H * 3 * D
        # Q and K as (rotated half 1, rotated half 2, pass-through) segments, as the training kernels hold them
        q1 = _gemv_segment(x_row, w_e, r, rm, H, 3 * D, BH, BR)
        q2 = _gemv_segment(x_row, w_e, R2 + r, rm, H, 3 * D, BH, BR)
        q3 = _gemv_segment(x_row, w_e, 2 * R2 + p, pm, H, 3 * D, BH, BP)
        k1 = _gemv_segment(x_row, w_e, D + r, rm, H, 3 * D, BH, BR)
        k2 = _gemv_segment(x_row, w_e, D + R2 + r, rm, H, 3 * D, BH, BR)
        k3 = _gemv_segment(x_row, w_e, D + 2 * R2 + p, pm, H, 3 * D, BH, BP)
        v = _gemv_segment(x_row, w_e, 2 * D + d, dm, H, 3 * D, BH, BD)
        if R2 > 0:  # RoPE at `position`: the reference's fp32 angles position * base^(-2i / rotary_dim)
            position = tl.load(pos_ptr).to(tl.float32)
            inv_freq = tl.exp2(-(2.0 * r.to(tl.float32) / (2 * R2)) * log2_base)
            angle = position * inv_freq
            cos = tl.cos(angle)
            sin = tl.sin(angle)
            q1, q2 = q1 * cos - q2 * sin, q2 * cos + q1 * sin
            k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
        # append K, V at the head's next slot
        cache_row = (head * (CAP + 1) + count) * D
        KT: tl.constexpr = k_ptr.dtype.element_ty
        tl.store(k_ptr + cache_row + r, k1.to(KT), mask=rm)
        tl.store(k_ptr + cache_row + R2 + r, k2.to(KT), mask=rm)
        tl.store(k_ptr + cache_row + 2 * R2 + p, k3.to(KT), mask=pm)
        tl.store(v_ptr + cache_row + d, v.to(KT), mask=dm)
        tl.store(counts_ptr + head, count + 1)
        # attention over slots 0..count (the new token included), online softmax in fp32; q and k are rounded to
        # the cache's dtype as the reference's attention sees them
        held = count + 1
        q1 = q1.to(KT).to(tl.float32)
        q2 = q2.to(KT).to(tl.float32)
        q3 = q3.to(KT).to(tl.float32)
        scale = 1.0 / tl.sqrt(D * 1.0)
        m_i = tl.full((), -float("inf"), tl.float32)
        l_i = tl.full((), 0.0, tl.float32)
        acc = tl.zeros([BD], tl.float32)
        head_cache = head * (CAP + 1) * D
        if SLOTS_BOUND > 0:  # the interpreter cannot loop to a run-time bound
            for s0 in range(0, SLOTS_BOUND, BS):
                m_i, l_i, acc = _attend_slots(k_ptr, v_ptr, head_cache, s0, held, q1, q2, q3, r, p, d, rm, pm, dm,
                                              scale, m_i, l_i, acc, D, R2, BS)
        else:
            for s0 in range(0, held, BS):
                m_i, l_i, acc = _attend_slots(k_ptr, v_ptr, head_cache, s0, held, q1, q2, q3, r, p, d, rm, pm, dm,
                                              scale, m_i, l_i, acc, D, R2, BS)
        score = tl.load(scores_ptr + pid).to(tl.float32)
        out = acc / l_i * score
    tl.store(attended_ptr + pid.to(tl.int64) * D + d, out, mask=dm)
    tl.store(written_ptr + pid, written.to(tl.int8))


@triton.jit
def _attend_slots(k_ptr, v_ptr, head_cache, s0, held, q1, q2, q3, r, p, d, rm, pm, dm, scale, m_i, l_i, acc,
                  D: tl.constexpr, R2: tl.constexpr, BS: tl.constexpr):
    """One block of BS cache slots into the online softmax (m_i, l_i, acc)."""
    slots = s0 + tl.arange(0, BS)
    sm = slots < held
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
def _sparse_decode_output_kernel(attended_ptr, written_ptr, heads_ptr, w_o_ptr, out_ptr, J: tl.constexpr,
                                 H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                                 ALL_HEADS: tl.constexpr):
    num_chunks = tl.cdiv(H, BH)
    b = tl.program_id(0) // num_chunks
    hs = (tl.program_id(0) % num_chunks) * BH + tl.arange(0, BH)
    hm = hs < H
    d = tl.arange(0, BD)
    dm = d < D
    acc = tl.zeros([BH], tl.float32)
    for j in range(J):
        slot = b.to(tl.int64) * J + j
        if tl.load(written_ptr + slot) != 0:
            if ALL_HEADS:
                e = j
            else:
                e = tl.load(heads_ptr + slot)
            a = tl.load(attended_ptr + slot * D + d, mask=dm, other=0.0)
            w = tl.load(w_o_ptr + e.to(tl.int64) * D * H + d[:, None] * H + hs[None, :],
                        mask=dm[:, None] & hm[None, :], other=0.0)
            acc += tl.sum(a[:, None] * w.to(tl.float32), 0)
    tl.store(out_ptr + b.to(tl.int64) * H + hs, acc.to(out_ptr.dtype.element_ty), mask=hm)


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
    attended = torch.empty(batch, width, head_dim, device=x.device, dtype=torch.float32)
    written = torch.empty(batch, width, device=x.device, dtype=torch.int8)
    block_d = _block(head_dim)
    _sparse_decode_heads_kernel[(batch * width,)](
        x, joined if heads is None else heads, joined, scores, position, w_qkv, cache_k, cache_v, counts,
        capacity_overflow, attended, written, num_heads, width, math.log2(rope_base),
        H=hidden, D=head_dim, R2=rotary_dim // 2, CAP=capacity, BR=_block(rotary_dim // 2),
        BP=_block(head_dim - rotary_dim), BD=block_d, BH=BLOCK_H, BS=BLOCK_SLOTS, ALL_HEADS=heads is None,
        SLOTS_BOUND=capacity + 1 if _interpreting() else 0, num_warps=4)
    out = torch.empty(batch, hidden, device=x.device, dtype=x.dtype)
    _sparse_decode_output_kernel[(batch * triton.cdiv(hidden, BLOCK_H),)](
        attended, written, joined if heads is None else heads, w_o, out, J=width, H=hidden, D=head_dim,
        BD=block_d, BH=BLOCK_H, ALL_HEADS=heads is None, num_warps=4)
    return out


@sparse_decode_triton.register_fake
def _sparse_decode_fake(x, heads, joined, scores, position, w_qkv, w_o, cache_k, cache_v, counts, capacity_overflow,
                        rotary_dim, rope_base):
    return x.new_empty(x.shape)
