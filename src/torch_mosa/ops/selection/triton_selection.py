"""Expert-choice top-k selection in one kernel: the exact k-th largest router logit by a bitwise search.

One program per (batch, head) row of router logits [B, E, T] (fp32). The logits are mapped to unsigned keys whose
order is the float order; 32 counting passes (one per bit, most significant first) find the k-th largest key
exactly, from registers when the row fits one chunk (T <= 4096); a last pass takes every key above it plus the
lowest-positioned keys equal to it (ties go to the lowest position, as in the reference's stable sort) and writes
them compacted, already in ascending position, with their sigmoid scores. Padded tokens get key 0 and are taken only
when a row has fewer than k real tokens; they land after the real slots with score 0. include_first forces each
row's first real token by giving it the largest key. Replaces torch.topk + two sorts + the masking passes around
them (about 1 ms in SPEC §6 case A).

A row longer than one chunk is read from memory on every pass, so there the k-th key is found a byte at a time
instead (radix select: four passes, each a 256-bin tl.histogram of the next byte among the keys that share the
bytes found so far), five reads of the row instead of 34: SPEC §6 case D (60 rows of 131072) went from 2.29 to
2.12 ms per layer step on an H100. For rows in registers the bitwise search stays: a first version of this kernel
used the four histogram passes there and took 0.78 ms in case A, slower than torch.topk.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from torch_mosa.checks import first_real_position

# Logits per chunk held in registers; longer rows loop over chunks. The chunk count is a compile-time constant
# (Triton 3.6's interpreter cannot loop to a run-time bound), so rows up to MAX_BLOCK_T share one compilation.
MAX_BLOCK_T = 4096
# SELECT_BY_SORT: rows that fit one chunk take their top k with Triton's bitonic top-k (`tl.topk`) on 64-bit words
# (key, then the position reversed, so ties go to the lowest position) and put them in position order with one
# `tl.sort` of k words, instead of the 33 counting passes of the bitwise search (each a reduction across the
# program's warps). About 15k compare-and-swap steps per 1024-logit row at k 16 against the search's 34k compares;
# off until timed (benchmarks/experiments/select_by_sort.py). Packed documents (`topk_route_segments_triton`, whose k
# varies by segment at run time) keep the search.
SELECT_BY_SORT = False


@triton.jit
def _row_keys(row_ptr, mask_row_ptr, first, t, T, HAS_MASK: tl.constexpr, INCLUDE_FIRST: tl.constexpr):
    """Keys of positions t: unsigned, ordered like the fp32 logits; 0 for padding, max for the forced token."""
    in_row = t < T
    logit = tl.load(row_ptr + t, mask=in_row, other=0.0).to(tl.float32)
    bits = logit.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    real = in_row
    if HAS_MASK:
        real = real & (tl.load(mask_row_ptr + t, mask=in_row, other=0) != 0)
    key = tl.where(real, tl.maximum(key, 1), 0)
    if INCLUDE_FIRST:
        key = tl.where(real & (t == first), 0xFFFFFFFF, key)
    return key, logit, in_row, real


@triton.jit
def _count_at_least(row_ptr, mask_row_ptr, first, offs, T, bound, key, in_row, NUM_CHUNKS: tl.constexpr,
                    BLOCK_T: tl.constexpr, HAS_MASK: tl.constexpr, INCLUDE_FIRST: tl.constexpr):
    """Number of keys >= bound in the row: from the registers (one chunk) or chunk by chunk (long rows)."""
    if NUM_CHUNKS == 1:
        count = tl.sum((in_row & (key >= bound)).to(tl.int32), 0)
    else:
        count = 0
        for chunk in range(NUM_CHUNKS):
            chunk_key, _, chunk_in_row, _ = _row_keys(row_ptr, mask_row_ptr, first, chunk * BLOCK_T + offs, T,
                                                      HAS_MASK, INCLUDE_FIRST)
            count += tl.sum((chunk_in_row & (chunk_key >= bound)).to(tl.int32), 0)
    return count


@triton.jit
def _radix_kth(row_ptr, mask_row_ptr, first, offs, T, K, HAS_MASK: tl.constexpr, INCLUDE_FIRST: tl.constexpr,
               BLOCK_T: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """(the K-th largest key of the row, how many keys equal to it the top K hold), by 4 radix-256 passes."""
    kth = tl.zeros([], tl.uint32)
    need = K  # of the keys that share kth's bytes found so far, how many the top K still takes
    digits = tl.arange(0, 256)
    for level in tl.static_range(4):
        shift = 24 - 8 * level
        histogram = tl.zeros([256], tl.int32)
        for chunk in range(NUM_CHUNKS):
            key, _, in_row, _ = _row_keys(row_ptr, mask_row_ptr, first, chunk * BLOCK_T + offs, T, HAS_MASK,
                                          INCLUDE_FIRST)
            match = in_row
            if level > 0:
                match = match & ((key >> (shift + 8)) == (kth >> (shift + 8)))
            histogram += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=match)
        # the largest digit with at least `need` matching keys at or above it
        at_or_above = tl.sum(histogram, 0) - tl.cumsum(histogram, 0) + histogram
        digit = tl.max(tl.where(at_or_above >= need, digits, 0), 0)
        need -= tl.sum(tl.where(digits > digit, histogram, 0), 0)
        kth = kth | (digit.to(tl.uint32) << shift)
    return kth, need


@triton.jit
def _take_chunk(idx_ptr, score_ptr, out_row, base, t, key, logit, in_row, real, kth, need, num_real, equal_seen,
                real_seen, pad_seen):
    """Write the chunk's chosen positions (base + t) to their slots; returns the updated running counts."""
    equal = in_row & (key == kth)
    equal_rank = equal_seen + tl.cumsum(equal.to(tl.int32), 0)
    take = in_row & ((key > kth) | (equal & (equal_rank <= need)))
    take_real = take & real
    take_pad = take & ~real
    slot = tl.where(take_real, real_seen + tl.cumsum(take_real.to(tl.int32), 0) - 1,
                    num_real + pad_seen + tl.cumsum(take_pad.to(tl.int32), 0) - 1)
    score = tl.where(take_real, 1.0 / (1.0 + tl.exp(-logit)), 0.0)
    tl.store(idx_ptr + out_row + slot, base + t.to(tl.int64), mask=take)
    tl.store(score_ptr + out_row + slot, score, mask=take)
    return (equal_seen + tl.sum(equal.to(tl.int32), 0), real_seen + tl.sum(take_real.to(tl.int32), 0),
            pad_seen + tl.sum(take_pad.to(tl.int32), 0))


@triton.jit
def _select_row_by_sort(row_ptr, mask_row_ptr, first, T, K, idx_ptr, score_ptr, out_row, HAS_MASK: tl.constexpr,
                        INCLUDE_FIRST: tl.constexpr, BLOCK_T: tl.constexpr, KP: tl.constexpr):
    """`_select_row` for a row in one chunk, by sorting (`SELECT_BY_SORT`); KP: K rounded up to a power of two.

    Words key << 32 | (BLOCK_T - 1 - t): the KP largest are the KP largest keys, ties to the lowest position, and
    positions past T (key 0, the smallest reversed positions) come after every padded one. Their first K are the
    selection; a second word (not chosen, padding, position) sorts them into the slots' order: real tokens by
    position, then padding by position."""
    offs = tl.arange(0, BLOCK_T)
    key, _, _, _ = _row_keys(row_ptr, mask_row_ptr, first, offs, T, HAS_MASK, INCLUDE_FIRST)
    words = (key.to(tl.uint64) << 32) | (BLOCK_T - 1 - offs).to(tl.uint64)
    top = tl.topk(words, KP)
    rank = tl.arange(0, KP)
    position = (BLOCK_T - 1 - (top & 0xFFFFFFFF)).to(tl.uint64)
    padding = (top >> 32) == 0  # real keys are at least 1
    order = tl.sort(((rank >= K).to(tl.uint64) << 63) | (padding.to(tl.uint64) << 62) | (position << 32))
    taken = (order >> 63) == 0
    position = ((order >> 32) & 0x3FFFFFFF).to(tl.int64)
    real = ((order >> 62) & 1) == 0
    logit = tl.load(row_ptr + position, mask=taken, other=0.0).to(tl.float32)
    score = tl.where(real, 1.0 / (1.0 + tl.exp(-logit)), 0.0)
    slots = tl.arange(0, KP)
    tl.store(idx_ptr + out_row + slots, position, mask=taken)
    tl.store(score_ptr + out_row + slots, score, mask=taken)


@triton.jit
def _topk_route_kernel(logits_ptr, mask_ptr, first_ptr, idx_ptr, score_ptr, E, T, K, stride_lb, stride_le,
                       HAS_MASK: tl.constexpr, INCLUDE_FIRST: tl.constexpr, BLOCK_T: tl.constexpr,
                       NUM_CHUNKS: tl.constexpr, KP: tl.constexpr, BY_SORT: tl.constexpr):
    row = tl.program_id(0)
    b = row // E
    e = row % E
    row_ptr = logits_ptr + b.to(tl.int64) * stride_lb + e.to(tl.int64) * stride_le
    mask_row_ptr = mask_ptr + b.to(tl.int64) * T
    first = -1
    if INCLUDE_FIRST:
        first = tl.load(first_ptr + b).to(tl.int32)
    if BY_SORT:
        _select_row_by_sort(row_ptr, mask_row_ptr, first, T, K, idx_ptr, score_ptr, row.to(tl.int64) * K, HAS_MASK,
                            INCLUDE_FIRST, BLOCK_T, KP)
    else:
        _select_row(row_ptr, mask_row_ptr, first, T, K, idx_ptr, score_ptr, row.to(tl.int64) * K, 0, HAS_MASK,
                    INCLUDE_FIRST, BLOCK_T, NUM_CHUNKS)


@triton.jit
def _topk_segments_kernel(logits_ptr, segments_ptr, idx_ptr, score_ptr, E, WIDTH, stride_lb, stride_le,
                          INCLUDE_FIRST: tl.constexpr, BLOCK_T: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """One program per (segment, head): segment s = (row b, start, length, k, slot offset) of a packed row, whose
    k largest logits go to slots offset .. offset + k - 1 of the row's WIDTH slots, positions start + t."""
    pid = tl.program_id(0)
    segment = segments_ptr + (pid // E).to(tl.int64) * 5
    e = pid % E
    b = tl.load(segment)
    start = tl.load(segment + 1)
    length = tl.load(segment + 2).to(tl.int32)
    k = tl.load(segment + 3).to(tl.int32)
    offset = tl.load(segment + 4)
    row_ptr = logits_ptr + b * stride_lb + e.to(tl.int64) * stride_le + start
    first = -1
    if INCLUDE_FIRST:
        first = 0
    _select_row(row_ptr, row_ptr, first, length, k, idx_ptr, score_ptr, (b * E + e) * WIDTH + offset, start, False,
                INCLUDE_FIRST, BLOCK_T, NUM_CHUNKS)


@triton.jit
def _select_row(row_ptr, mask_row_ptr, first, T, K, idx_ptr, score_ptr, out_row, base, HAS_MASK: tl.constexpr,
                INCLUDE_FIRST: tl.constexpr, BLOCK_T: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """The K largest keys of a row of T logits at row_ptr, written to slots out_row .. out_row + K - 1 as positions
    base + t, ascending."""
    offs = tl.arange(0, BLOCK_T)
    # a row that fits one chunk stays in registers for the whole search
    key, logit, in_row, real = _row_keys(row_ptr, mask_row_ptr, first, offs, T, HAS_MASK, INCLUDE_FIRST)
    if NUM_CHUNKS == 1:
        # the k-th largest key, bit by bit from the top: the largest value with at least K keys at or above it
        kth = tl.zeros([], tl.uint32)
        one = tl.full([], 1, tl.uint32)
        for bit in tl.static_range(31, -1, -1):
            candidate = kth | (one << bit)
            count = _count_at_least(row_ptr, mask_row_ptr, first, offs, T, candidate, key, in_row, NUM_CHUNKS,
                                    BLOCK_T, HAS_MASK, INCLUDE_FIRST)
            kth = tl.where(count >= K, candidate, kth)
        # take every key above the k-th and the lowest-positioned `need` keys equal to it
        need = K - _count_at_least(row_ptr, mask_row_ptr, first, offs, T, kth + 1, key, in_row, NUM_CHUNKS, BLOCK_T,
                                   HAS_MASK, INCLUDE_FIRST)
        if kth == 0xFFFFFFFF:  # kth + 1 wrapped: every key equal to the maximum is "at or above" it
            need = K
    else:
        # a long row is read from memory once per pass: find the k-th largest key a byte at a time (radix select,
        # 4 passes, each a 256-bin histogram of the next byte among keys sharing the bytes found so far) instead
        # of a bit at a time (32 passes)
        kth, need = _radix_kth(row_ptr, mask_row_ptr, first, offs, T, K, HAS_MASK, INCLUDE_FIRST, BLOCK_T,
                               NUM_CHUNKS)
    # padding (key 0) is taken only when kth == 0, after every real key
    num_real = tl.where(kth == 0, K - need, K)
    if NUM_CHUNKS == 1:
        _take_chunk(idx_ptr, score_ptr, out_row, base, offs, key, logit, in_row, real, kth, need, num_real, 0, 0, 0)
    else:
        equal_seen = 0
        real_seen = 0
        pad_seen = 0
        for chunk in range(NUM_CHUNKS):
            t = chunk * BLOCK_T + offs
            key, logit, in_row, real = _row_keys(row_ptr, mask_row_ptr, first, t, T, HAS_MASK, INCLUDE_FIRST)
            equal_seen, real_seen, pad_seen = _take_chunk(idx_ptr, score_ptr, out_row, base, t, key, logit, in_row,
                                                          real, kth, need, num_real, equal_seen, real_seen, pad_seen)


def topk_route_triton(logits: torch.Tensor, k: int, include_first: bool, attention_mask=None):
    """Same contract as `topk_route_reference`: logits [B, E, T] (any strides with unit stride along T, any float
    dtype; read as fp32) -> indices [B, E, k] int64, scores [B, E, k] float32. A torch.library custom op, so
    torch.compile keeps it in its graph."""
    return _topk_route_op(logits.detach(), int(k), bool(include_first), attention_mask)


@torch.library.custom_op("torch_mosa::topk_route", mutates_args=())
def _topk_route_op(logits: torch.Tensor, k: int, include_first: bool, attention_mask: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_heads, seq_len = logits.shape
    logits, indices, scores = _selection_buffers(logits, k, torch.empty)  # the kernel writes every slot
    has_mask = attention_mask is not None
    mask = attention_mask.to(torch.uint8).contiguous() if has_mask else indices
    first = first_real_position(attention_mask, batch, logits.device) if include_first else indices
    blocks = _row_blocks(seq_len)
    by_sort = SELECT_BY_SORT and blocks["NUM_CHUNKS"] == 1
    _topk_route_kernel[(batch * num_heads,)](
        logits, mask, first, indices, scores, num_heads, seq_len, k, logits.stride(0), logits.stride(1),
        HAS_MASK=has_mask, INCLUDE_FIRST=include_first, KP=max(2, triton.next_power_of_2(k)) if by_sort else 1,
        BY_SORT=by_sort, **blocks)
    return indices, scores


def _row_blocks(seq_len: int) -> dict:
    """Chunk size, chunk count and warps for rows of up to seq_len logits: 1 warp per 512 logits, at most 8, except
    4 for rows of 1024. The bitwise search is bound by instruction issue, not memory (Nsight Compute, H100: 275 GB/s,
    issue slots 47-74% busy), and 4 warps per 1024-row keep more of them busy: 363 against 407 us at 2 warps for
    SPEC §6 case A's 32,320 rows on an H200, 364 against 408 on an H100 (benchmarks/results/select-before-after-
    h200-2026-11-24-0850.log, select-ncu-h100-2026-11-24-0836.log; session 6 measured the same on an H200)."""
    block_t = min(MAX_BLOCK_T, max(16, triton.next_power_of_2(seq_len)))
    warps = 4 if block_t == 1024 else max(1, min(8, block_t // 512))
    return dict(BLOCK_T=block_t, NUM_CHUNKS=triton.cdiv(seq_len, block_t), num_warps=warps)


def _selection_buffers(logits: torch.Tensor, width: int, allocate):
    """(logits with unit stride along T, indices [B, E, width] int64, scores [B, E, width] float32 from allocate)."""
    batch, num_heads, _ = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return (logits, allocate(batch, num_heads, width, device=logits.device, dtype=torch.int64),
            allocate(batch, num_heads, width, device=logits.device, dtype=torch.float32))


def _selection_fake(logits: torch.Tensor, width: int):
    batch, num_heads, _ = logits.shape
    return (logits.new_empty(batch, num_heads, width, dtype=torch.int64),
            logits.new_empty(batch, num_heads, width, dtype=torch.float32))


_topk_route_op.register_fake(lambda logits, k, include_first, attention_mask: _selection_fake(logits, k))


def topk_route_segments_triton(logits: torch.Tensor, segments: torch.Tensor, width: int, include_first: bool):
    """Per-document top-k (see `topk_route_documents`): logits [B, E, T], segments [N, 5] int64 rows (b, start,
    length, k_d, slot offset) -> indices, scores [B, E, width]; slots no segment fills hold position 0, score 0."""
    return _topk_segments_op(logits.detach(), segments, int(width), bool(include_first))


@torch.library.custom_op("torch_mosa::topk_route_segments", mutates_args=())
def _topk_segments_op(logits: torch.Tensor, segments: torch.Tensor, width: int, include_first: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_heads, seq_len = logits.shape
    logits, indices, scores = _selection_buffers(logits, width, torch.zeros)  # slots no segment fills stay 0
    _topk_segments_kernel[(segments.shape[0] * num_heads,)](
        logits, segments.contiguous(), indices, scores, num_heads, width, logits.stride(0), logits.stride(1),
        INCLUDE_FIRST=include_first, **_row_blocks(seq_len))
    return indices, scores


_topk_segments_op.register_fake(lambda logits, segments, width, include_first: _selection_fake(logits, width))
