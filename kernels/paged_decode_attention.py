"""Paged attention for decode (one query token per request), split-KV with a reduction.

One program handles one (request, KV head, split): the ``group`` query heads that share
the KV head are the rows of a single ``tl.dot`` (GQA), so every K/V tile is read once.
When the batch is too small to fill the GPU, the context is split across programs and a
second kernel merges the partial softmaxes; a short context gets one split and no second
kernel. The split count depends only on the batch shape and a host-side bound of the
context (``max_seq_len``, else the block-table width), never on ``seq_lens`` values, and
any count is correct for any ``seq_lens``: a CUDA graph captured for a count replays
correctly for every batch of its shape.

An FP8 cache is read as ``k * k_scale`` and ``v * v_scale``: tiles are converted to the
query's dtype (exact: every e4m3 value is a float16/bfloat16 value), ``k_scale`` is folded
into the softmax scale and ``v_scale`` multiplies the output.

``rotary_paged_decode_attention`` also does the rotary embedding and the KV write of the
step's new token (what ``rotary_kv_cache_write`` launches separately): q and the new key
are rotated in registers, the split that visits the new key stores it and its value at the
token's slot and uses them from registers, and the first key tile, written by earlier
steps, is requested before the kernel waits for the one that writes q, k and v.

Sparse patterns skip keys rather than mask them: a sliding window starts each request at
its window; the strided pattern (the ``stride`` latest keys, then every ``stride``-th key
before them) visits only those keys, gathered by position through the block table, so a
long context costs ``stride + context / stride`` keys instead of ``context``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_scale,
    check_tensor,
    dot_precision,
    gdc_launch_dependents,
    gdc_wait,
    is_interpreter,
    launch_dependent_args,
    next_power_of_2,
    num_sms,
)
from kernels.fp8 import FP8_DTYPE
from kernels.kv_cache_write import cache_value, check_kv_write_args, inverse_scales
from kernels.rotary import check_rotary_shapes

_LOG2E = 1.4426950408889634
# Fewer context tokens than this per split costs more in the reduction than it saves.
# (H200, batch 1, 8 KV heads: a 256-token context takes 13.9 us in one split, 9.5 us in
# four; 1024 tokens 16.6 us in four splits, 12.4 us in eight.)
_MIN_TOKENS_PER_SPLIT = 64
_MAX_SPLITS = 64
# Whether the kernel with the new token reads its first key tile before it waits.
EARLY_TILE = True


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
def _attend_tile(q, k, v, nmask, m_i, l_i, acc, scale_log2, softcap_mul, softcap_log2,
                 HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax: the running max, sum and output, updated."""
    s = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), scale_log2,
                softcap_mul, softcap_log2, HAS_SOFTCAP)
    s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _load_tile(kc_ptr, vc_ptr, table, n0, end, kv_head, d, dmask, block_size, stride_cb,
               stride_ct, stride_ch, num_far, far_first, local_lo, attention_stride,
               BLOCK_N: tl.constexpr, IS_STRIDED: tl.constexpr):
    """Keys and values of visited keys ``[n0, n0 + BLOCK_N)`` (those before ``end``), in
    the cache's dtype, with their positions and mask."""
    pos = n0 + tl.arange(0, BLOCK_N)
    nmask = pos < end
    if IS_STRIDED:
        pos = tl.where(pos < num_far, far_first + pos * attention_stride,
                       local_lo + pos - num_far)
    blk = tl.load(table + pos // block_size, mask=nmask, other=0).to(tl.int64)
    kv_off = blk * stride_cb + (pos % block_size).to(tl.int64) * stride_ct \
        + kv_head * stride_ch
    kv_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(kc_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    return k, v, pos, nmask


@triton.jit
def _rotated(base, rows, d, partner, dmask, rmask, cos, sin_signed):
    """Rows of one token's heads rotated: ``x * cos + x[partner] * (+-sin)`` in float32
    (``cos = 1, sin = 0`` past the rotary dims), rounded to the element type."""
    mask = rmask[:, None] & dmask[None, :]
    x = tl.load(base + rows[:, None] + d[None, :], mask=mask, other=0.0)
    xp = tl.load(base + rows[:, None] + partner[None, :], mask=mask, other=0.0)
    return (x.to(tl.float32) * cos[None, :] + xp.to(tl.float32) * sin_signed[None, :]
            ).to(x.dtype)


@triton.jit
def _paged_decode_attention_kernel(
        q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
        stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
        stride_ot, stride_oh, num_heads, scale_log2, block_size, sliding_window,
        softcap_mul, softcap_log2, v_scale, attention_stride,
        pos_ptr, slot_ptr, k_ptr, v_ptr, cos_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_cos, rot_half, k_inv_scale, v_inv_scale,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        IS_STRIDED: tl.constexpr = False, USE_GDC: tl.constexpr = False,
        NEW_KV: tl.constexpr = False, IS_NEOX: tl.constexpr = True,
        IS_FP8: tl.constexpr = False, EARLY_TILE: tl.constexpr = True):
    if USE_GDC:
        gdc_launch_dependents()
        if not (NEW_KV and EARLY_TILE):  # launched early: wait for the kernels before
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
    table = bt_ptr + req * stride_bt
    if NEW_KV and EARLY_TILE:
        # The first tile, read before the wait: only the new key, written by this kernel,
        # is not in the cache yet, and it replaces its row from registers.
        k0, v0, pos0, nmask0 = _load_tile(kc_ptr, vc_ptr, table, start, end, kv_head, d,
                                          dmask, block_size, stride_cb, stride_ct, stride_ch,
                                          num_far, far_first, local_lo, attention_stride,
                                          BLOCK_N, IS_STRIDED)
        if USE_GDC:  # the kernel before writes q, k and v
            gdc_wait()
    if NEW_KV:
        # The new token: q and its key rotated here, the key and value stored at its slot
        # by the split that visits it, and used from registers by that split.
        tok_pos = tl.load(pos_ptr + req).to(tl.int64)
        in_rot = d < 2 * rot_half
        if IS_NEOX:  # halves: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
            first = d < rot_half
            c_idx = tl.where(first, d, d - rot_half)
            partner = tl.where(first, d + rot_half, d - rot_half)
        else:  # interleaved pairs
            first = d % 2 == 0
            c_idx = d // 2
            partner = d ^ 1
        partner = tl.where(in_rot, partner, d)
        cos = tl.load(cos_ptr + tok_pos * stride_cos + c_idx, mask=in_rot, other=1.0)
        sin = tl.load(cos_ptr + tok_pos * stride_cos + rot_half + c_idx, mask=in_rot,
                      other=0.0)
        cos = cos.to(tl.float32)
        sin = tl.where(first, -sin.to(tl.float32), sin.to(tl.float32))
        q = _rotated(q_ptr + req * stride_qt, heads * stride_qh, d, partner, dmask, gmask,
                     cos, sin)
        k_new = _rotated(k_ptr + req * stride_kt + kv_head * stride_kh, tl.zeros([1], tl.int64),
                         d, partner, dmask, tl.full([1], 1, tl.int1), cos, sin)
        v_new = tl.load(v_ptr + req * stride_vt + kv_head * stride_vh + d[None, :],
                        mask=dmask[None, :], other=0.0)
        k_new = cache_value(k_new, k_inv_scale, IS_FP8).to(kc_ptr.dtype.element_ty)
        v_new = cache_value(v_new, v_inv_scale, IS_FP8).to(vc_ptr.dtype.element_ty)
        slot = tl.load(slot_ptr + req).to(tl.int64)
        new_idx = hi - 1  # the new key's visited index
        if (slot >= 0) & (start <= new_idx) & (new_idx < end):
            off = (slot // block_size) * stride_cb + (slot % block_size) * stride_ct \
                + kv_head * stride_ch + d[None, :]
            tl.store(kc_ptr + off, k_new, mask=dmask[None, :])
            tl.store(vc_ptr + off, v_new, mask=dmask[None, :])
    else:
        q = tl.load(q_ptr + req * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    loop_start = start
    if NEW_KV and EARLY_TILE:
        is_new = (pos0 == seq_len - 1)[:, None]
        k0 = tl.where(is_new, k_new, k0)
        v0 = tl.where(is_new, v_new, v0)
        if start < end:  # an empty split keeps m = -inf (an all-masked tile: NaN)
            m_i, l_i, acc = _attend_tile(q, k0.to(q.dtype), v0.to(q.dtype), nmask0, m_i, l_i,
                                         acc, scale_log2, softcap_mul, softcap_log2,
                                         HAS_SOFTCAP, DOT_PRECISION)
        loop_start = start + BLOCK_N
    for n0 in range(loop_start, end, BLOCK_N):
        k, v, pos, nmask = _load_tile(kc_ptr, vc_ptr, table, n0, end, kv_head, d, dmask,
                                      block_size, stride_cb, stride_ct, stride_ch, num_far,
                                      far_first, local_lo, attention_stride, BLOCK_N,
                                      IS_STRIDED)
        if NEW_KV:
            is_new = (pos == seq_len - 1)[:, None]
            k = tl.where(is_new, k_new, k)
            v = tl.where(is_new, v_new, v)
        m_i, l_i, acc = _attend_tile(q, k.to(q.dtype), v.to(q.dtype), nmask, m_i, l_i, acc,
                                     scale_log2, softcap_mul, softcap_log2, HAS_SOFTCAP,
                                     DOT_PRECISION)
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
    m = tl.load(part_ml_ptr + row * 2, mask=smask, other=float("-inf"))
    l_part = tl.load(part_ml_ptr + row * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    # Empty splits carry m = -inf; a fully empty row (seq_len 0) must not make NaN.
    w = tl.where(m > float("-inf"), tl.exp2(m - tl.where(m_max > float("-inf"), m_max, 0.0)),
                 0.0)
    denom = tl.sum(l_part * w, axis=0)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :],
                  mask=smask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
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
    check_tensor("key_cache", key_cache, ndim=4, dtypes=(query.dtype, FP8_DTYPE), device=dev,
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


def pick_num_splits(num_reqs: int, num_kv_heads: int, max_context: int,
                    device: torch.device) -> int:
    """Splits per (request, KV head): none once two programs per SM exist, else about four
    programs per SM (a power of two, to bound recompiles; measured on H100)."""
    programs = max(1, num_reqs * num_kv_heads)
    sms = num_sms(device)
    if programs >= 2 * sms:
        return 1
    splits = min(triton.cdiv(4 * sms, programs), max_context // _MIN_TOKENS_PER_SPLIT,
                 _MAX_SPLITS)
    return 1 << (max(1, splits).bit_length() - 1)


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, query_start_loc: torch.Tensor | None,
                           scale: float, sliding_window: int | None = None,
                           num_splits: int | None = None,
                           max_seq_len: int | None = None,
                           logit_softcap: float | None = None,
                           attention_stride: int | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0,
                           block_n: int | None = None, num_warps: int = 4,
                           num_stages: int = 3) -> torch.Tensor:
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
        block_n, num_warps, num_stages: launch overrides (keys per loop iteration, default
            64 for 16-bit inputs; Triton's warps and pipeline stages), for tuning sweeps.
    Returns:
        ``[B, H, D]`` attention output in query's dtype.
    """
    _check_paged_args(query, key_cache, value_cache, block_tables, seq_lens, k_scale, v_scale)
    if query_start_loc is not None and query_start_loc.shape[0] != query.shape[0] + 1:
        raise ValueError(f"query_start_loc must have {query.shape[0] + 1} entries, "
                         f"got {query_start_loc.shape[0]}.")
    return _launch(query, key_cache, value_cache, block_tables, seq_lens, scale,
                   sliding_window, num_splits, max_seq_len, logit_softcap, attention_stride,
                   k_scale, v_scale, block_n, num_warps, num_stages, None)


def rotary_paged_decode_attention(positions: torch.Tensor, query: torch.Tensor,
                                  key: torch.Tensor, value: torch.Tensor,
                                  key_cache: torch.Tensor, value_cache: torch.Tensor,
                                  slot_mapping: torch.Tensor, cos_sin_cache: torch.Tensor,
                                  is_neox_style: bool, block_tables: torch.Tensor,
                                  seq_lens: torch.Tensor, scale: float,
                                  sliding_window: int | None = None,
                                  num_splits: int | None = None,
                                  max_seq_len: int | None = None,
                                  logit_softcap: float | None = None,
                                  attention_stride: int | None = None,
                                  k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """``rotary_kv_cache_write`` then ``paged_decode_attention``, in one kernel (plus the
    split-KV reduction): the query and the new key are rotated in registers, the new key
    and value are stored at their slot and used from registers, and the rest of the first
    key tile is read before the kernel waits for the one that writes ``query``.

    Unlike ``rotary_kv_cache_write``, ``query`` is left as it was.

    Args:
        positions: ``[B]`` int32/int64, each request's new token (``seq_lens - 1``).
        query: ``[B, H, D]``; key, value: ``[B, Hkv, D]``; one dtype, last dim contiguous
            (views of a fused qkv output are fine).
        slot_mapping: ``[B]`` the new tokens' slots (-1: a padding row, nothing stored).
        cos_sin_cache: ``[max_positions, rot_dim]`` = ``cat(cos, sin)``.
        is_neox_style: rotate halves (NeoX/Llama) or interleaved pairs (GPT-J).
        The others: as ``paged_decode_attention``.
    Returns:
        ``[B, H, D]`` attention output in query's dtype.
    """
    check_kv_write_args(key, value, key_cache, value_cache, slot_mapping)
    k_inv, v_inv, is_fp8 = inverse_scales(key_cache, k_scale, v_scale)
    _check_paged_args(query, key_cache, value_cache, block_tables, seq_lens, k_scale, v_scale)
    if key.dtype != query.dtype:
        raise ValueError(f"key must have query's dtype {query.dtype}, got {key.dtype}.")
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=query.device)
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=FLOAT_DTYPES,
                 device=query.device, last_dim_contiguous=True)
    if key.shape[0] != query.shape[0]:
        raise ValueError(f"key must have {query.shape[0]} rows, got {key.shape[0]}.")
    check_rotary_shapes(positions, cos_sin_cache, query.shape[0], query.shape[2])
    new_kv = (positions, slot_mapping, key, value, cos_sin_cache, bool(is_neox_style),
              k_inv, v_inv, is_fp8)
    return _launch(query, key_cache, value_cache, block_tables, seq_lens, scale,
                   sliding_window, num_splits, max_seq_len, logit_softcap, attention_stride,
                   k_scale, v_scale, None, 4, 3, new_kv)


def _launch(query, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window,
            num_splits, max_seq_len, logit_softcap, attention_stride, k_scale, v_scale,
            block_n, num_warps, num_stages, new_kv) -> torch.Tensor:
    num_reqs, num_heads, head_dim = query.shape
    if num_reqs != seq_lens.shape[0]:
        raise ValueError(f"query must have one row per request ({seq_lens.shape[0]}), "
                         f"got {num_reqs}; use prefill_attention for longer queries.")
    check_pattern(sliding_window, attention_stride)
    scale = float(scale) * k_scale
    softcap_mul, softcap_log2 = softcap_args(scale, logit_softcap)
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    out = torch.empty_like(query)
    if num_reqs == 0:
        return out
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size
    if max_seq_len is not None:
        max_context = min(max_context, max_seq_len)
    if sliding_window is not None:
        max_context = min(max_context, sliding_window)
    if attention_stride is not None:
        max_context = min(max_context, attention_stride + max_context // attention_stride)
    if num_splits is None:
        num_splits = pick_num_splits(num_reqs, num_kv_heads, max_context, query.device)
    block_d = max(16, next_power_of_2(head_dim))
    if block_n is None:
        block_n = 16 if is_interpreter() else (64 if query.dtype != torch.float32 else 32)
    if num_splits > 1:
        part_acc = torch.empty(num_reqs * num_heads * num_splits, head_dim,
                               dtype=torch.float32, device=query.device)
        part_ml = torch.empty(num_reqs * num_heads * num_splits, 2, dtype=torch.float32,
                              device=query.device)
    else:
        part_acc = part_ml = out
    if new_kv is None:  # the new-token arguments are unused: any tensor, zeros
        positions = slots = key = value = cos_sin = query
        new_args = (0, 0, 0, 0, 0, 0, 1.0, 1.0)
        is_neox = is_fp8 = False
    else:
        positions, slots, key, value, cos_sin, is_neox, k_inv, v_inv, is_fp8 = new_kv
        new_args = (key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                    cos_sin.stride(0), cos_sin.shape[1] // 2, k_inv, v_inv)
    pdl = launch_dependent_args(query.device)
    _paged_decode_attention_kernel[(num_reqs, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens, out, part_acc, part_ml,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        num_heads, float(scale) * _LOG2E, block_size,
        sliding_window if sliding_window is not None else 0, softcap_mul, softcap_log2,
        float(v_scale), attention_stride or 1, positions, slots, key, value, cos_sin,
        *new_args, GROUP=group,
        BLOCK_G=max(16, next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=logit_softcap is not None,
        DOT_PRECISION=dot_precision(query.dtype), IS_STRIDED=attention_stride is not None,
        NEW_KV=new_kv is not None, IS_NEOX=is_neox, IS_FP8=is_fp8, EARLY_TILE=EARLY_TILE,
        num_warps=num_warps, num_stages=num_stages, **pdl)
    if num_splits > 1:
        _paged_decode_reduce_kernel[(num_reqs, num_heads)](
            part_acc, part_ml, out, out.stride(0), out.stride(1), num_heads,
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            BLOCK_S=next_power_of_2(num_splits), num_warps=4, **pdl)
    return out
