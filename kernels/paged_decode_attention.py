"""Paged attention for decode (one query token per request), split-KV with a reduction.

One program handles one (request, KV head, split): the ``group`` query heads that share
the KV head are the rows of a single ``tl.dot`` (GQA), so every K/V tile is read once.
When the batch is too small to fill the GPU, the context is split across programs and a
second kernel merges the partial softmaxes; a short context gets one split and no second
kernel. The split count depends only on the batch shape and a host-side bound of the
context (``max_seq_len``, else the block-table width), never on ``seq_lens`` values, and
any count is correct for any ``seq_lens``: a CUDA graph captured for a count replays
correctly for every batch of its shape.

An FP8 cache (e4m3 or e5m2) is read as ``k * k_scale`` and ``v * v_scale``: tiles are
converted to 16 bits (exact: every e4m3 and e5m2 value is a float16/bfloat16 value),
``k_scale`` is folded into the softmax scale and ``v_scale`` multiplies the output. With a
bfloat16 query the products run in float16 (the query and the probabilities converted
once per tile): e4m3 converts to float16 in one instruction per pair, to bfloat16 only
through float16 and a further instruction per element, and the conversion, not the
halved bytes, set the kernel's time.
On CUDA e4m3 key and value tiles are read as 32-bit words and unpacked to float16 in
registers (``e4m3_words_to_f16``): as bytes the value tile reached P @ V's operand layout
(whose reduction dim, the keys, is not contiguous) one shared-memory load per byte.

Over an e4m3 cache under a 16-bit query on CUDA 9.0+ (head dim 128, no window, cap or
strided pattern) the batch goes to a Gluon kernel instead (``kernels.fp8_decode_attention``,
one split or split-KV, its partial results merged by this module's merge kernel): its tiles
reach the tensor cores from registers, where this kernel's pass through shared memory held
it at ~70-75% of copy bandwidth (H200, batch 256 x 616 keys: 102.5 -> 88.9 us; batch 4 x
32k keys split: 98.9 -> 76.5 us). Its one-warp programs take more splits
(``pick_num_splits(one_warp=True)``).

Split-KV over an FP8 cache in this kernel (``_default_launch``) runs the products transposed
(``KEY_ROWS``): keys and dims are the MMA's rows and the GQA group's query heads its columns,
``S^T = K Q^T`` and ``O^T += V^T P^T``, so a group of 4 pads to the MMA's 8 columns instead
of its 16 rows (half the MMAs and half the accumulator's registers).

Sparse patterns skip keys rather than mask them: a sliding window starts each request at
its window; the strided pattern (the ``stride`` latest keys, then every ``stride``-th key
before them) visits only those keys, gathered by position through the block table, so a
long context costs ``stride + context / stride`` keys instead of ``context``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import fp8_decode_attention as gluon_fp8
from kernels._launch import Launcher
from kernels._utils import (
    EARLY_READS,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    can_unpack_e4m3_words,
    check_scale,
    check_shape,
    check_tensor,
    dot_precision,
    e4m3_words_to_f16,
    gdc_launch_dependents,
    gdc_wait,
    is_interpreter,
    kept,
    launch_dependent_args,
    next_power_of_2,
    num_sms,
)
from kernels.fp8 import FP8_DTYPE, FP8_KV_DTYPES, is_fp8

_LOG2E = 1.4426950408889634
# Fewer context tokens than this per split costs more in the reduction than it saves.
# (H100, batch-1 bf16 Llama-3-8B decode over 128-160 tokens, the merge launched early
# behind the split kernel: 5.24 ms a step at 16 against 5.31 at 32.)
_MIN_TOKENS_PER_SPLIT = 16
# The same for the one-warp Gluon kernel over an FP8 cache (16-key tiles): H100, batch-1
# FP8 Llama-3-8B decode over 128-160 tokens, ms a step, at least 8 / 16 / 32 / 64 / 1,024
# keys a split 3.288 / 3.304-3.321 / 3.354 / 3.377 / 3.391 (a split shorter than a tile
# leaves some splits empty).
_MIN_TOKENS_PER_SPLIT_ONE_WARP = 8
_MAX_SPLITS = 64
# Keys per iteration where the context, not the SMs, bounds the split count (each split
# then holds _MIN_TOKENS_PER_SPLIT to twice as many keys).
_SHORT_SPLIT_BLOCK_N = 32
# Pipeline stages (H200, bf16 cache, L2 of clean lines, two stages against three: batch 1 x
# 32k keys 74.8% of copy against 61.1%, batch 2 87.7% / 68.2%, batch 4 95.7% / 72.4%,
# batch 64 x 4096 100% / 76%, batch 256 x 616 87.5% / 85.2%): a third stage's shared
# memory leaves fewer programs resident per SM.
_NUM_STAGES = 2
# Split-KV over a 16-bit cache where the SMs set the split count: (keys per iteration,
# warps, stages, key_rows, register cap), and whether block numbers load a tile ahead
# (_default_launch).
_SPLIT_LAUNCH = (32, 4, 3, False, None)
_SPLIT_PREFETCH = False
# Over an FP8 cache with one split, up to this many programs per SM take the small-grid
# launch of _default_launch.
_FP8_SMALL_GRID_PROGRAMS_PER_SM = 4
# With one split, at least this many programs per SM take the one-warp launch of
# _default_launch.
_ONE_WARP_PROGRAMS_PER_SM = 7
# Over an FP8 cache, the one-warp launch by programs per SM: up to 8 (what fits at the
# compiler's 190 registers a thread) as compiled, up to 10 with 168 registers, past that 16
# keys per iteration and 128 registers (see _default_launch).
_FP8_ONE_WARP_RESIDENT = 8
_FP8_ONE_WARP_CAPPED = 10


@triton.jit
def _scores(qk, scale_log2, softcap_mul, softcap_log2, HAS_SOFTCAP: tl.constexpr):
    """q.k products as log2-scaled logits; with soft-capping ``c * tanh(scale * qk / c)``
    (Gemma 2), where ``softcap_mul = scale / c`` and ``softcap_log2 = c * log2(e)``."""
    if HAS_SOFTCAP:
        # tanh(x) = 2 * sigmoid(2x) - 1 (sigmoid is in every Triton backend).
        return softcap_log2 * (2.0 * tl.sigmoid(2.0 * softcap_mul * qk) - 1.0)
    return qk * scale_log2


def softcap_args(scale: float, logit_softcap: float | None) -> tuple[float, float]:
    """``(softcap_mul, softcap_log2)`` kernel arguments (unused zeros without a cap)."""
    if logit_softcap is None:
        return 0.0, 0.0
    if not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be positive, got {logit_softcap}.")
    return float(scale) / logit_softcap, logit_softcap * _LOG2E


@triton.jit
def _tile_slots(n0, end, num_far, far_first, local_lo, attention_stride, block_size,
                BLOCK_N: tl.constexpr, IS_STRIDED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """``(mask, block-table index, offset in the block)`` of the keys of the tile that
    starts at visited key ``n0`` (see the kernel for the strided pattern's mapping)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    nmask = pos < end
    if IS_STRIDED:
        pos = tl.where(pos < num_far, far_first + pos * attention_stride,
                       local_lo + pos - num_far)
    if BLOCK_SIZE > 0:
        # A compile-time block size (over an FP8 cache): a power of two divides by a
        # shift, not an integer division per key and element, which the conversion made
        # count there. (Measured on bf16 caches too: 1-2% faster at large batches, one
        # batch-1 32k sample slower; left run-time there until re-measured.)
        return nmask, pos // BLOCK_SIZE, pos % BLOCK_SIZE
    return nmask, pos // block_size, pos % block_size


@triton.jit
def _e4m3_word_tile(cache_ptr, kv_off, nmask, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_D]`` float16 tile of an e4m3 cache at element offsets ``kv_off``
    (one per key), read as 32-bit words and unpacked in registers (``e4m3_words_to_f16``).
    As bytes, a tile reached P @ V's operand layout (whose reduction dim, the keys, is not
    contiguous) one shared-memory load per byte; K as words is 0.5-2% faster than as bytes
    (H200, batch 1 x 32k to 256 x 616 keys)."""
    d4 = tl.arange(0, BLOCK_D // 4)
    words = tl.load(cache_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
                    + (kv_off >> 2)[:, None] + d4[None, :],
                    mask=nmask[:, None] & (d4 < HEAD_DIM // 4)[None, :], other=0)
    return e4m3_words_to_f16(words, BLOCK_N, BLOCK_D)


@triton.jit
def _paged_decode_attention_kernel(
        q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
        stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
        stride_ot, stride_oh, num_heads, scale_log2, block_size, sliding_window,
        softcap_mul, softcap_log2, v_scale, attention_stride,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        IS_STRIDED: tl.constexpr = False, USE_GDC: tl.constexpr = False,
        F16_DOTS: tl.constexpr = False, BLOCK_SIZE: tl.constexpr = 0,
        KV_WORDS: tl.constexpr = False, PREFETCH_TABLE: tl.constexpr = False,
        KEY_ROWS: tl.constexpr = False):
    if USE_GDC:  # launched early: wait for the kernels before (they write q, the cache)
        gdc_launch_dependents()
        gdc_wait()
    req = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
    # The only query sits at position seq_len - 1 and sees [lo, seq_len). The loop runs
    # over visited keys ("virtual" indices [lo, hi)); only the strided pattern maps them to
    # other positions: first the far keys (every stride-th), then the latest stride.
    lo = 0
    hi = seq_len
    num_far = 0
    far_first = 0
    local_lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - sliding_window, 0)
    if IS_STRIDED:
        local_lo = tl.maximum(seq_len - attention_stride, 0)
        num_far = tl.maximum(seq_len - 1, 0) // attention_stride
        far_first = seq_len - 1 - num_far * attention_stride
        hi = num_far + seq_len - local_lo
    per_split = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, hi)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + req * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if F16_DOTS:
        q = q.to(tl.float16)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    # KEY_ROWS: the products run transposed (see the module's docstring).
    if KEY_ROWS:
        qt = tl.trans(q)
        acc = tl.zeros([BLOCK_D, BLOCK_G], tl.float32)
    else:
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = bt_ptr + req * stride_bt
    # PREFETCH_TABLE: each tile's block numbers are loaded one iteration ahead, so no K/V
    # address waits on a load of its own iteration (H200, 16-bit cache, one split: batch
    # 256 x 616 keys 89% -> 94% of copy bandwidth, batch 64 x 4096 unchanged; with splits,
    # batch 2-4 x 32k keys lost 3-4%, and FP8 caches were unchanged, so those keep the
    # in-iteration load).
    if PREFETCH_TABLE:
        nmask, table_idx, in_block = _tile_slots(start, end, num_far, far_first, local_lo,
                                                 attention_stride, block_size, BLOCK_N,
                                                 IS_STRIDED, BLOCK_SIZE)
        blk_next = tl.load(table + table_idx, mask=nmask, other=0)
    for n0 in range(start, end, BLOCK_N):
        nmask, table_idx, in_block = _tile_slots(n0, end, num_far, far_first, local_lo,
                                                 attention_stride, block_size, BLOCK_N,
                                                 IS_STRIDED, BLOCK_SIZE)
        if PREFETCH_TABLE:
            blk = blk_next.to(tl.int64)
            next_mask, next_idx, _ = _tile_slots(n0 + BLOCK_N, end, num_far, far_first,
                                                 local_lo, attention_stride, block_size,
                                                 BLOCK_N, IS_STRIDED, BLOCK_SIZE)
            blk_next = tl.load(table + next_idx, mask=next_mask, other=0)
        else:
            blk = tl.load(table + table_idx, mask=nmask, other=0).to(tl.int64)
        kv_off = blk * stride_cb + in_block.to(tl.int64) * stride_ct \
            + kv_head * stride_ch
        kv_mask = nmask[:, None] & dmask[None, :]
        if KV_WORDS:
            k = _e4m3_word_tile(kc_ptr, kv_off, nmask, HEAD_DIM, BLOCK_N, BLOCK_D)
        else:
            k = tl.load(kc_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            k = k.to(q.dtype)
        if KEY_ROWS:
            st = _scores(tl.dot(k, qt, input_precision=DOT_PRECISION), scale_log2,
                         softcap_mul, softcap_log2, HAS_SOFTCAP)
            st = tl.where(nmask[:, None], st, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(st, axis=0))
            alpha = tl.exp2(m_i - m_new)
            pt = tl.exp2(st - m_new[None, :])
            l_i = l_i * alpha + tl.sum(pt, axis=0)
        else:
            s = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), scale_log2,
                        softcap_mul, softcap_log2, HAS_SOFTCAP)
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_WORDS:
            v = _e4m3_word_tile(vc_ptr, kv_off, nmask, HEAD_DIM, BLOCK_N, BLOCK_D)
        else:
            v = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = v.to(q.dtype)
        if KEY_ROWS:
            acc = acc * alpha[None, :] + tl.dot(tl.trans(v), pt.to(v.dtype),
                                                input_precision=DOT_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v,
                                                input_precision=DOT_PRECISION)
        m_i = m_new
    if KEY_ROWS:
        acc = tl.trans(acc)
    acc = acc * v_scale

    if NUM_SPLITS == 1:
        # seq_len 0 (a padded CUDA-graph row) leaves l_i at 0: write zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + req * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:
        row = (req * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc,
                 mask=gmask[:, None] & dmask[None, :])
        tl.store(part_ml_ptr + row * 2, m_i, mask=gmask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=gmask)


@triton.jit
def _paged_decode_reduce_kernel(part_acc_ptr, part_ml_ptr, out_ptr, stride_ot, stride_oh,
                                num_heads, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                                USE_GDC: tl.constexpr = False):
    if USE_GDC:
        gdc_launch_dependents()
        gdc_wait()
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    row = (req * num_heads + head) * NUM_SPLITS + s
    # Every load first, in one round trip to L2 (the sums do not wait for the maxima's
    # reductions).
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :],
                  mask=smask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    m = tl.load(part_ml_ptr + row * 2, mask=smask, other=float("-inf"))
    l_part = tl.load(part_ml_ptr + row * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    # Empty splits carry m = -inf; a fully empty row (seq_len 0) must not make NaN.
    w = tl.where(m > float("-inf"), tl.exp2(m - tl.where(m_max > float("-inf"), m_max, 0.0)),
                 0.0)
    denom = tl.sum(l_part * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + req * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def check_pattern(sliding_window: int | None, attention_stride: int | None) -> None:
    """ValueError unless the sparse pattern arguments are usable together."""
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}.")
    if attention_stride is not None and attention_stride <= 0:
        raise ValueError(f"attention_stride must be positive, got {attention_stride}.")
    if sliding_window is not None and attention_stride is not None:
        raise ValueError("sliding_window and attention_stride cannot be combined: pick one "
                         "sparse pattern.")


def _check_paged_args(query, key_cache, value_cache, block_tables, seq_lens,
                      k_scale: float = 1.0, v_scale: float = 1.0):
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    dev = query.device
    check_tensor("key_cache", key_cache, ndim=4, dtypes=(query.dtype, *FP8_KV_DTYPES), device=dev,
                 last_dim_contiguous=True)
    check_tensor("value_cache", value_cache, ndim=4, dtypes=(key_cache.dtype,), device=dev,
                 last_dim_contiguous=True)
    check_scale("k_scale", k_scale)
    check_scale("v_scale", v_scale)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=INDEX_DTYPES, device=dev,
                 last_dim_contiguous=True)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=dev,
                 contiguous=True)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"key_cache head dim must be {head_dim}, got {key_cache.shape[3]}.")
    if value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError("value_cache must have key_cache's shape and strides.")
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key_cache "
                         f"heads ({num_kv_heads}).")
    if block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"block_tables must have {seq_lens.shape[0]} rows, "
                         f"got {block_tables.shape[0]}.")
    if head_dim < 16 and is_interpreter():
        raise ValueError("head_dim must be >= 16 (tl.dot).")


def fp8_f16_dots(key_cache: torch.Tensor, query: torch.Tensor) -> bool:
    """Whether the attention kernels take their products in float16: an FP8 cache under a
    bfloat16 query (see the module's docstring)."""
    return is_fp8(key_cache.dtype) and query.dtype == torch.bfloat16


def kv_words(key_cache: torch.Tensor, value_cache: torch.Tensor, query: torch.Tensor,
             head_dim: int) -> bool:
    """Whether the kernel reads an FP8 cache's key and value tiles as 32-bit words (float16
    products, a head dim of whole words, word-aligned strides and starts; CUDA only)."""
    return (key_cache.dtype == FP8_DTYPE and fp8_f16_dots(key_cache, query)
            and head_dim % 4 == 0
            and can_unpack_e4m3_words(key_cache) and can_unpack_e4m3_words(value_cache))


def _splits_for_sms(programs: int, device: torch.device, one_warp: bool = False) -> int:
    sms = num_sms(device)
    if programs >= 2 * sms:
        return 1
    if one_warp:
        return min(triton.cdiv(8 * sms, programs), 2 * _MAX_SPLITS)
    return min(triton.cdiv(4 * sms, programs), _MAX_SPLITS)


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def pick_num_splits(num_reqs: int, num_kv_heads: int, max_context: int,
                    device: torch.device, one_warp: bool = False) -> int:
    """Splits per (request, KV head): none once two programs per SM exist, else about four
    programs per SM (a power of two, to bound recompiles; measured on H100), and no fewer
    than ``_MIN_TOKENS_PER_SPLIT`` context tokens per split. ``one_warp``: for the Gluon
    kernel over an FP8 cache (``fp8_decode_attention.serves``), whose programs are one warp,
    about eight per SM, up to twice ``_MAX_SPLITS`` and ``_MIN_TOKENS_PER_SPLIT_ONE_WARP``
    tokens a split (H200, 8 KV heads, us, the tl.dot
    kernel at its count / Gluon at the same / at twice: batch 1 x 32k keys 33.4 / 29.9 /
    26.5, 2 x 32k 55.7 / 49.1 / 42.0, 4 x 32k 98.9 / 87.0 / 74.0, 8 x 16k 98.8 / 87.2 /
    73.9, 32 x 4096 99.1 / 87.4 / 78.1, 1 x 4096 13.3 / 12.2 / 11.9)."""
    programs = max(1, num_reqs * num_kv_heads)
    least = _MIN_TOKENS_PER_SPLIT_ONE_WARP if one_warp else _MIN_TOKENS_PER_SPLIT
    return _pow2_floor(min(_splits_for_sms(programs, device, one_warp), max_context // least))


def _default_block_n(num_reqs: int, num_kv_heads: int, num_splits: int,
                     dtype: torch.dtype, device: torch.device,
                     cache_dtype: torch.dtype | None = None) -> int:
    """Keys per iteration: 64 for 16-bit inputs (32 for float32, 128 over an FP8 cache), and
    ``_SHORT_SPLIT_BLOCK_N`` when the split count is below what the SMs would take (the
    context bounded it, so each split is short). A function of the batch shape and the
    split count only: one variant per CUDA-graph class."""
    if is_interpreter():
        return 16
    block_n = 64 if dtype != torch.float32 else 32
    if is_fp8(cache_dtype):
        # Half the bytes per key: twice the keys per iteration keep as many bytes in flight
        # (H200, bf16 queries: 1.3-1.5x faster at batch 256 x 616, 64 x 4096, 1 x 32k keys).
        block_n = 128
    programs = max(1, num_reqs * num_kv_heads)
    if 1 < num_splits < _pow2_floor(_splits_for_sms(programs, device)):
        block_n = min(block_n, _SHORT_SPLIT_BLOCK_N)
    return block_n


def _default_launch(num_reqs: int, num_kv_heads: int, num_splits: int, dtype: torch.dtype,
                    device: torch.device, cache_dtype: torch.dtype | None = None,
                    head_dim: int = 128) -> tuple[int, int, int, bool, int | None]:
    """``(keys per iteration, warps, pipeline stages, key_rows, register cap)``:
    ``_default_block_n`` with 4 warps, ``_NUM_STAGES`` and the compiler's register count,
    except with a head dim up to 128 (at 256 the fewer warps below spill registers: ptxas,
    one warp over a bf16 cache 272 bytes, over FP8 96, two warps over FP8 92; four warps
    none):

    - one split, a 16-bit query and at least ``_ONE_WARP_PROGRAMS_PER_SM`` programs per SM:
      32 keys and one warp (H200, Llama-3-8B heads; FP8 cache: batch 256 x 616 keys 130.1
      -> 113.7 us, 128 x 616 71.1 -> 60.3, 128 x 4096 404 -> 335, 256 x 2048 391 -> 337;
      bf16 cache: 164.6 -> 160.4, 86.6 -> 83.4, 501 -> 498). Three programs of four warps
      fill an SM's registers and shared memory; eight of one warp fit, and a warp needs no
      barrier to share its row maxima and probabilities. Below that (768 programs, batch 96
      x 616 over FP8: 52.7 against 55.7 us) too few warps are left to hide the loads.
    - one split over an FP8 cache and at most ``_FP8_SMALL_GRID_PROGRAMS_PER_SM`` programs
      per SM: 64 keys, 2 warps, 3 stages (batch 64 x 616 / 4096 keys, 8 KV heads: 39.2 /
      201.3 us against 44.4 / 242.1; 512 programs of 128 keys and 4 warps took 1.3 waves).
    - split-KV over an FP8 cache under a bfloat16 query, where the SMs set the split count:
      the transposed products (``key_rows``), 64 keys, 2 warps, 3 stages (H200, 8 KV heads:
      batch 1 x 32k keys 40.9 -> 33.5 us, 4 x 32k 131.6 -> 99.8, 8 x 16k 132.4 -> 99.4,
      32 x 4096 130.5 -> 100.2, 1 x 4096 15.7 -> 13.2). Short splits (the context bounds
      their count) keep 32 keys: there the transposed launch was up to 0.5 us slower (1 x
      256 keys 8.5 against 9.0 us). Over a bf16 cache, and with one split at large
      batches, the transposed products were slower (batch 256 x 616 over FP8: 122.0
      against 113.5 us).
    - split-KV over a 16-bit cache (where the SMs set the split count, and short splits
      alike, so each count is one variant whatever the batch): ``_SPLIT_LAUNCH``,
      32 keys, 4 warps, 3 stages (H200, 8 KV heads, against 64 keys and 2 stages, two
      sweeps on separate days, us: batch 1 x 32k keys 43.1 -> 41.4, 2 x 32k 72.8 -> 71.9,
      4 x 32k 133.4 -> 131.6, 2 x 8192 27.1 -> 26.2, 4 x 8192 42.5 -> 40.4, with block
      numbers a tile ahead; short splits not timed, but with them on this launch no
      decode variant compiles after warm-up, which an H200 run checked on 2026-12-05).
      Block numbers load with their tile (``_SPLIT_PREFETCH``): a tile ahead, as one
      graph's only call they were as fast (H100, within 0.6%), but as a step's layers run
      them, 8 calls a graph over their own caches, 6-10% slower (H100, us: 1 x 32k 57.3
      against 51.5, 2 x 32k 106.9 / 96.1, 4 x 32k 203.6 / 184.5, 1 x 8192 20.3 / 18.0,
      2 x 8192 33.7 / 30.0, 4 x 8192 58.5 / 52.7; ``benchmarks/split_kv_ab.py``).
    - over an FP8 cache, the one-warp launch caps the registers once more programs than
      fit at the compiler's 190 a thread (8 per SM) would take a second, mostly empty, wave
      (``_fp8_one_warp_launch``): up to 10 per SM at 168 registers, past that 16 keys per
      iteration at 128 (H200, 8 KV heads, 616 / 1024 keys, us: batch 136 94.0 / 146.2 ->
      70.4 / 108.1, 160 x 1024 161.0 -> 111.7, 176 107.4 / 166.4 -> 82.9 / 130.4, 200 109.3
      / 168.4 -> 93.3 / 147.1, 256 114.0 / 175.7 -> 103.6 / 164.0; at 128 x 616, within one
      wave, the cap cost 2 us; at 136, 16 keys were 5-13 us slower than 32)."""
    programs = num_reqs * num_kv_heads
    block_n = _default_block_n(num_reqs, num_kv_heads, num_splits, dtype, device, cache_dtype)
    if head_dim <= 128 and not is_interpreter():
        sms = num_sms(device)
        if num_splits == 1:
            if dtype != torch.float32 and programs >= _ONE_WARP_PROGRAMS_PER_SM * sms:
                if is_fp8(cache_dtype):
                    return _fp8_one_warp_launch(programs, sms)
                return 32, 1, _NUM_STAGES, False, None
            if is_fp8(cache_dtype) and programs <= _FP8_SMALL_GRID_PROGRAMS_PER_SM * sms:
                return 64, 2, 3, False, None
        elif (is_fp8(cache_dtype) and dtype == torch.bfloat16
              and block_n != _SHORT_SPLIT_BLOCK_N):
            return 64, 2, 3, True, None
        elif not is_fp8(cache_dtype) and dtype != torch.float32:
            # Short splits too: a split count's variant must not depend on the batch (the
            # warm-up builds each count at batch 1).
            return _SPLIT_LAUNCH
    return block_n, 4, _NUM_STAGES, False, None


def _prefetches(num_splits: int, cache_dtype: torch.dtype, launch: tuple) -> bool:
    """Whether the default launch loads block numbers a tile ahead: over a 16-bit cache
    with one split, or with split-KV's ``_SPLIT_LAUNCH`` where ``_SPLIT_PREFETCH``."""
    return not is_fp8(cache_dtype) and (
        num_splits == 1 or (launch == _SPLIT_LAUNCH and _SPLIT_PREFETCH))


def _fp8_one_warp_launch(programs: int, sms: int) -> tuple[int, int, int, bool, int | None]:
    """The one-warp launch over an FP8 cache for ``programs`` on ``sms`` SMs (see
    ``_default_launch``)."""
    if programs <= _FP8_ONE_WARP_RESIDENT * sms:
        return 32, 1, _NUM_STAGES, False, None
    if programs <= _FP8_ONE_WARP_CAPPED * sms:
        return 32, 1, _NUM_STAGES, False, 168
    return 16, 1, _NUM_STAGES, False, 128


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, query_start_loc: torch.Tensor | None,
                           scale: float, sliding_window: int | None = None,
                           num_splits: int | None = None,
                           max_seq_len: int | None = None,
                           logit_softcap: float | None = None,
                           attention_stride: int | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0,
                           block_n: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None,
                           key_rows: bool | None = None,
                           max_registers: int | None = None,
                           gluon: bool | None = None,
                           prefetch_table: bool | None = None,
                           check: bool = True,
                           out: torch.Tensor | None = None,
                           batch_cache: dict | None = None) -> torch.Tensor:
    """Drop-in for ``torch_ref.paged_attention`` on decode-only batches.

    Args:
        query: ``[B, H, D]``, one token per request (``query_start_loc`` must be
            ``arange(B + 1)``; it is not read, to avoid a device sync).
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]``, query's dtype or
            ``float8_e4m3fn`` (read as ``k * k_scale``, ``v * v_scale``).
        block_tables: ``[B, max_blocks]`` int32/int64.
        seq_lens: ``[B]`` tokens in the cache per request (the query's KV included);
            0 marks a padding row, whose output is zeros.
        scale: softmax scale.
        sliding_window: keys with ``pos_q - pos_k >= sliding_window`` are hidden.
        num_splits: split-KV count override (default: a heuristic on the batch shape).
        max_seq_len: a bound of ``seq_lens`` known on the host (sizes the split count;
            default: the block table's width).
        logit_softcap: caps the scaled scores at ``c * tanh(s / c)`` (Gemma 2).
        attention_stride: the strided pattern with this stride (not with a window).
        k_scale, v_scale: the FP8 cache's scales (1.0 for other caches).
        block_n, num_warps, num_stages, key_rows, max_registers: launch overrides (keys
            per loop iteration, Triton's warps, pipeline stages, the transposed products,
            keys as the MMA's rows, and a cap on registers a thread, 0 for none; each
            default from ``_default_launch``), for tuning sweeps.
        prefetch_table: whether the ``tl.dot`` kernel loads each tile's block numbers one
            iteration ahead (default: with one split over a 16-bit cache), for sweeps.
        gluon: whether the Gluon kernel over an FP8 cache (``kernels.fp8_decode_attention``)
            runs the batch instead of the ``tl.dot`` kernel; default: wherever it can
            (``fp8_decode_attention.serves``). Its launch takes ``block_n`` and
            ``num_stages`` (default ``fp8_decode_attention.default_launch``).
        check: validate the arguments; ``False`` only for a caller that has (a prefill
            kernel's split, whose host time per layer counts in eager steps).
        out: ``[B, H, D]`` in query's dtype, last dim contiguous, to write into (a view
            of a bigger step's output), allocated if None.
        batch_cache: a dict that lives as long as this batch layout (a step's layers share
            it), where the launch is kept for the step's other layers (``_DecodePlan``;
            built on each call without it). Its parts' buffers are shared by those calls,
            which must run one after another on one stream.
    Returns:
        ``out``: the attention output in query's dtype.
    """
    num_reqs, num_heads, head_dim = query.shape
    if check:
        _check_paged_args(query, key_cache, value_cache, block_tables, seq_lens, k_scale,
                          v_scale)
        if num_reqs != seq_lens.shape[0]:
            raise ValueError(f"query must have one row per request ({seq_lens.shape[0]}), "
                             f"got {num_reqs}; use prefill_attention for longer queries.")
        if query_start_loc is not None and query_start_loc.shape[0] != num_reqs + 1:
            raise ValueError(f"query_start_loc must have {num_reqs + 1} entries, "
                             f"got {query_start_loc.shape[0]}.")
        check_pattern(sliding_window, attention_stride)
        if out is not None:
            check_tensor("out", out, ndim=3, dtypes=(query.dtype,), device=query.device,
                         last_dim_contiguous=True)
            check_shape("out", out, query.shape)
    scale = float(scale) * k_scale
    softcap_mul, softcap_log2 = softcap_args(scale, logit_softcap)
    if out is None:
        out = torch.empty_like(query)
    if num_reqs == 0:
        return out
    overrides = (num_splits, block_n, num_warps, num_stages, key_rows, max_registers, gluon,
                 prefetch_table)
    key = ("decode_plan", num_reqs, num_heads, query.dtype, key_cache.dtype,
           value_cache.dtype, tuple(key_cache.shape[1:]), block_tables.shape[1], max_seq_len,
           sliding_window, logit_softcap is None, attention_stride, overrides)
    plan = kept(batch_cache, key, lambda: _decode_plan(
        query, key_cache, value_cache, block_tables, max_seq_len, sliding_window,
        logit_softcap, attention_stride, *overrides))
    part_acc = out if plan.part_acc is None else plan.part_acc
    part_ml = out if plan.part_ml is None else plan.part_ml
    scale_log2 = scale * _LOG2E
    if plan.attend is None:
        gluon_fp8.fp8_decode_attention(
            query, key_cache, value_cache, block_tables, seq_lens, out,
            scale_log2, float(v_scale), plan.gluon_launch[0],
            plan.gluon_launch[1], plan.use_gdc, plan.num_splits, part_acc, part_ml,
            early_reads=EARLY_READS)
    else:
        # (Each tensor's strides in one call: this runs for every layer of a mixed step.)
        q_stride, kc_stride, out_stride = query.stride(), key_cache.stride(), out.stride()
        plan.attend(
            plan.grid, query, key_cache, value_cache, block_tables, seq_lens, out, part_acc,
            part_ml, q_stride[0], q_stride[1], kc_stride[0], kc_stride[1], kc_stride[2],
            block_tables.stride(0), out_stride[0], out_stride[1], num_heads, scale_log2,
            key_cache.shape[1],
            sliding_window if sliding_window is not None else 0, softcap_mul, softcap_log2,
            float(v_scale), attention_stride or 1)
    if plan.num_splits > 1:
        plan.merge(plan.merge_grid, part_acc, part_ml, out, out.stride(0), out.stride(1),
                   num_heads)
    return out


class _DecodePlan(NamedTuple):
    """A batch shape's launch: the split count, the parts' buffers, and the split kernel's
    and merge's grids and launchers (their compile-time arguments; after the first call
    they may launch the compiled kernels directly, ``kernels._launch``), or the Gluon
    kernel's launch (``attend`` None). Kept in ``batch_cache`` for a step's other layers,
    whose calls differ only in their caches and scales (a mixed step's decodes run eagerly
    between the pieces of its graphs, where the host's time per layer counts)."""
    num_splits: int
    part_acc: torch.Tensor | None
    part_ml: torch.Tensor | None
    grid: tuple[int, int, int]
    merge_grid: tuple[int, int]
    attend: Launcher | None
    merge: Launcher | None
    gluon_launch: tuple[int, int]
    use_gdc: bool


def _decode_plan(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, max_seq_len: int | None,
                 sliding_window: int | None, logit_softcap: float | None,
                 attention_stride: int | None, num_splits: int | None,
                 block_n: int | None, num_warps: int | None, num_stages: int | None,
                 key_rows: bool | None, max_registers: int | None, gluon: bool | None,
                 prefetch_table: bool | None) -> _DecodePlan:
    num_reqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size
    if max_seq_len is not None:
        max_context = min(max_context, max_seq_len)
    if sliding_window is not None:
        max_context = min(max_context, sliding_window)
    if attention_stride is not None:
        max_context = min(max_context, attention_stride + max_context // attention_stride)
    can_gluon = gluon_fp8.serves(query, key_cache, value_cache, sliding_window, logit_softcap,
                                 attention_stride)
    if gluon and not can_gluon:
        raise ValueError("gluon=True needs an FP8 cache under a 16-bit query on a CUDA GPU "
                         "of compute capability 9.0+, head dim 128, a GQA group of up to 16 "
                         "and no window, cap or strided pattern.")
    use_gluon = can_gluon and gluon is not False
    if num_splits is None:
        num_splits = pick_num_splits(num_reqs, num_kv_heads, max_context, query.device,
                                     one_warp=use_gluon)
    pdl = launch_dependent_args(query.device)
    part_acc = part_ml = None
    if num_splits > 1:
        part_acc = torch.empty(num_reqs * num_heads * num_splits, head_dim,
                               dtype=torch.float32, device=query.device)
        part_ml = torch.empty(num_reqs * num_heads * num_splits, 2, dtype=torch.float32,
                              device=query.device)
    block_d = max(16, next_power_of_2(head_dim))
    attend = None
    gluon_launch = (0, 0)
    if use_gluon:
        g_block_n, g_stages = gluon_fp8.default_launch(num_reqs * num_kv_heads, num_splits,
                                                       num_sms(query.device))
        gluon_launch = (block_n or g_block_n, num_stages or g_stages)
    else:
        launch = _default_launch(num_reqs, num_kv_heads, num_splits, query.dtype, query.device,
                                 key_cache.dtype, head_dim)
        block_n = launch[0] if block_n is None else block_n
        num_warps = launch[1] if num_warps is None else num_warps
        num_stages = launch[2] if num_stages is None else num_stages
        key_rows = launch[3] if key_rows is None else key_rows
        max_registers = launch[4] if max_registers is None else max_registers or None
        attend = Launcher(
            _paged_decode_attention_kernel, GROUP=group,
            BLOCK_G=next_power_of_2(group) if key_rows else max(16, next_power_of_2(group)),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_N=block_n, NUM_SPLITS=num_splits,
            HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=logit_softcap is not None,
            DOT_PRECISION=dot_precision(query.dtype), IS_STRIDED=attention_stride is not None,
            F16_DOTS=fp8_f16_dots(key_cache, query),
            BLOCK_SIZE=block_size if is_fp8(key_cache.dtype) else 0,
            KV_WORDS=kv_words(key_cache, value_cache, query, head_dim),
            PREFETCH_TABLE=(_prefetches(num_splits, key_cache.dtype, launch)
                            if prefetch_table is None else prefetch_table),
            KEY_ROWS=bool(key_rows),
            num_warps=num_warps, num_stages=num_stages, **pdl,
            **({} if max_registers is None else dict(maxnreg=max_registers)))
    merge = None
    if num_splits > 1:
        merge = Launcher(_paged_decode_reduce_kernel, HEAD_DIM=head_dim, BLOCK_D=block_d,
                         NUM_SPLITS=num_splits, BLOCK_S=next_power_of_2(num_splits),
                         num_warps=4, **pdl)
    return _DecodePlan(num_splits, part_acc, part_ml, (num_reqs, num_kv_heads, num_splits),
                       (num_reqs, num_heads), attend, merge, gluon_launch,
                       bool(pdl["USE_GDC"]))
