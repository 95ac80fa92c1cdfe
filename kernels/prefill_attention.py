"""Varlen prefill/extend attention over the paged KV cache (causal, GQA, sliding window).

Request ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``, its last
tokens; their KV is already in the cache, so a chunk attends to the cached prefix and to
itself through the same block table. One program handles ``BLOCK_M`` queries of one head,
a tile of ``prefill_args.query_tiles`` (the batch's tiles, not every request times the
longest chunk's: a step of continuous batching mixes one chunk with many one-token
requests; ``split_one_token`` sends those to the decode kernel instead):
key tiles fully below the diagonal run without masks, the rest with the causal/window mask.
A sliding window starts each query tile at its window; under the strided pattern (the
``stride`` latest keys, then every ``stride``-th) a key tile in which no query of the tile
sees any key is skipped, so with a stride wider than the tiles most tiles are.
An FP8 cache is read as in ``paged_decode_attention`` (``k_scale`` folded into the softmax
scale, ``v_scale`` applied to the output).

On Hopper and later GPUs, a cache in the query's (16-bit) dtype with blocks of at least
``_TMA_MIN_BLOCK`` tokens is read by the tensor memory accelerator instead
(``_prefill_attention_tma_kernel``): each key/value tile is one bulk copy per cache block
it spans (one or two) into shared memory, where the products read it. Gathering the tile
row by row through pointers (the general kernel) costs about a quarter of the throughput
at 4 x 4096 tokens; blocks of 16 tokens would need a copy per 16 keys and products 16 keys
wide, which measured slower than the general kernel (see docs/performance.md).
``GRIDLLM_PREFILL_TMA=0`` turns the path off (A/B runs). Query chunks of 64+ tokens that
``kernels.gluon_prefill_attention.serves`` takes (Hopper, head dim 128, a 16-bit cache)
go to the warp-specialized Gluon kernel instead, the fastest of the three on an H200 (see
its module); ``GRIDLLM_GLUON_PREFILL=0`` keeps them here. Steps of few prompt tokens
(``kernels.chunk_attention.serves``) go to the chunk kernel, whose programs take the GQA
group's heads together and split the keys, instead of a program per head walking them
all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import chunk_attention as chunk_kernel
from kernels._utils import (
    GLUON_PREFILL,
    PREFILL_TMA,
    SPLIT_ONE_TOKEN,
    capability,
    check_shape,
    check_tensor,
    dot_precision,
    is_interpreter,
    kept,
    next_power_of_2,
)
from kernels.gluon_prefill_attention import BLOCK_M as GLUON_BLOCK_M
from kernels.gluon_prefill_attention import PERSISTENT as GLUON_PERSISTENT
from kernels.gluon_prefill_attention import gluon_prefill_attention
from kernels.gluon_prefill_attention import serves as gluon_serves
from kernels.paged_decode_attention import (
    _LOG2E,
    _scores,
    check_pattern,
    fp8_f16_dots,
    paged_decode_attention,
    softcap_args,
)
from kernels.prefill_args import (
    _attend_tile,
    cached_query_tiles,
    check_prefill_args,
    longest_query,
)

try:  # host-side TMA descriptors (Triton 3.4+)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - an older Triton: the general kernel only
    TensorDescriptor = None

# Smallest cache block the TMA kernel reads: a 64-key tile is at most two bulk copies.
_TMA_MIN_BLOCK = 32


@triton.jit
def _query_tile(tiles_ptr, slot, BLOCK_M: tl.constexpr):
    """Slot ``slot`` of ``query_tiles`` (one load round trip): ``(req, q_row, first_pos,
    hi, q_pos, q_rows, is_query)``: the request (-1: an empty slot), the tile's first row
    in the packed query tensor, the first query's position, the end of the keys any of
    the tile's queries sees, the queries' positions, their rows, and which of the tile's
    rows are the request's queries (those whose position is in the sequence)."""
    row = tiles_ptr + 4 * slot
    req = tl.load(row)
    q_row = tl.load(row + 1)
    first_pos = tl.load(row + 2)
    seq_len = tl.load(row + 3)
    hi = tl.minimum(first_pos + BLOCK_M, seq_len)
    m = tl.arange(0, BLOCK_M)
    q_pos = first_pos + m
    return (req.to(tl.int64), q_row, first_pos, hi, q_pos, (q_row + m).to(tl.int64),
            q_pos < seq_len)


@triton.jit
def _prefill_attention_kernel(
        q_ptr, kc_ptr, vc_ptr, bt_ptr, tiles_ptr, out_ptr,
        stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
        stride_ot, stride_oh, scale_log2, block_size, sliding_window,
        softcap_mul, softcap_log2, v_scale, attention_stride,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        IS_STRIDED: tl.constexpr = False, F16_DOTS: tl.constexpr = False):
    head = tl.program_id(0).to(tl.int64)
    req, q_row, first_pos, hi, q_pos, q_rows, is_query = _query_tile(
        tiles_ptr, tl.program_id(1), BLOCK_M)
    if req < 0:
        return
    d = tl.arange(0, BLOCK_D)
    io_mask = is_query[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=io_mask, other=0.0)
    if F16_DOTS:  # an FP8 cache under a bfloat16 query (see paged_decode_attention)
        q = q.to(tl.float16)
    kv_head = head // GROUP
    table = bt_ptr + req * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if IS_STRIDED:
        for n0 in range(0, hi, BLOCK_N):
            # Distances between this tile's queries and the key tile's keys.
            min_dist = first_pos - (n0 + BLOCK_N - 1)
            max_dist = hi - 1 - n0
            if (min_dist < attention_stride) | (
                    max_dist // attention_stride * attention_stride >= min_dist):
                acc, m_i, l_i = _attend_tile(
                    acc, m_i, l_i, q, q_pos, kc_ptr, vc_ptr, table, kv_head, n0, hi,
                    block_size, sliding_window, stride_cb, stride_ct, stride_ch, scale_log2,
                    softcap_mul, softcap_log2, HEAD_DIM, BLOCK_D, BLOCK_N, True, False,
                    HAS_SOFTCAP, DOT_PRECISION, attention_stride, True)
    elif HAS_WINDOW:
        lo = tl.maximum(first_pos - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
        for n0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, q_pos, kc_ptr, vc_ptr, table, kv_head, n0, hi,
                block_size, sliding_window, stride_cb, stride_ct, stride_ch, scale_log2,
                softcap_mul, softcap_log2, HEAD_DIM, BLOCK_D, BLOCK_N, True, True, HAS_SOFTCAP,
                DOT_PRECISION)
    else:
        # Tiles whose last key is at or before the tile's first query need no mask.
        full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, q_pos, kc_ptr, vc_ptr, table, kv_head, n0, hi,
                block_size, sliding_window, stride_cb, stride_ct, stride_ch, scale_log2,
                softcap_mul, softcap_log2, HEAD_DIM, BLOCK_D, BLOCK_N, False, False,
                HAS_SOFTCAP, DOT_PRECISION)
        for n0 in range(full_end, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, q_pos, kc_ptr, vc_ptr, table, kv_head, n0, hi,
                block_size, sliding_window, stride_cb, stride_ct, stride_ch, scale_log2,
                softcap_mul, softcap_log2, HEAD_DIM, BLOCK_D, BLOCK_N, True, False,
                HAS_SOFTCAP, DOT_PRECISION)
    out = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _tma_row(table, pos, hi, block_size):
    """Cache row (block * block_size + offset) of key ``pos``; block 0 past ``hi`` (the
    tile's keys there are masked, and the table may end before them)."""
    blk = tl.load(table + pos // block_size, mask=pos < hi, other=0).to(tl.int32)
    return blk * block_size + pos % block_size


@triton.jit
def _tma_scores(q, desc_k, table, pos0, col, q_pos, hi, scale_log2, softcap_mul,
                softcap_log2, sliding_window, block_size, PIECE: tl.constexpr,
                MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Scores of one cache block's keys ``pos0 .. pos0 + PIECE``: raw q.k on the fast path
    (unmasked, no cap: the scale is folded into the exponent), else log2-scaled logits with
    hidden keys at -inf (any garbage past the sequence included)."""
    qk = tl.dot(q, desc_k.load([_tma_row(table, pos0, hi, block_size), col]).T)
    if not MASKED and not HAS_SOFTCAP:
        return qk
    s = _scores(qk, scale_log2, softcap_mul, softcap_log2, HAS_SOFTCAP)
    if MASKED:
        pos = pos0 + tl.arange(0, PIECE)
        visible = (pos[None, :] <= q_pos[:, None]) & (pos < hi)[None, :]
        if HAS_WINDOW:
            visible = visible & (q_pos[:, None] - pos[None, :] < sliding_window)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _tma_values(acc, s, m_ref, desc_v, table, pos0, col, hi, scale_log2, block_size,
                PIECE: tl.constexpr, FAST: tl.constexpr, TAIL: tl.constexpr):
    """``acc + exp2(s - m) @ V`` over one cache block's keys, and the row sums of exp2."""
    if FAST:
        p = tl.math.exp2(s * scale_log2 - m_ref[:, None])
    else:
        p = tl.math.exp2(s - m_ref[:, None])
    v = desc_v.load([_tma_row(table, pos0, hi, block_size), col])
    if TAIL:  # rows past the sequence may hold anything (NaN * 0 is NaN)
        pos = pos0 + tl.arange(0, PIECE)
        v = tl.where((pos < hi)[:, None], v, 0.0)
    return tl.dot(p.to(v.dtype), v, acc), tl.sum(p, axis=1)


@triton.jit
def _tma_tile(acc, m_i, l_i, q, q_pos, desc_k, desc_v, table, col, n0, hi, block_size,
              sliding_window, scale_log2, softcap_mul, softcap_log2, PIECE: tl.constexpr,
              PIECES: tl.constexpr, MASKED: tl.constexpr, TAIL: tl.constexpr,
              HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """One key tile of ``PIECES`` cache blocks' worth (``PIECE`` keys each): online softmax
    as in ``_attend_tile``. ``TAIL``: the tile reaches past the sequence."""
    FAST: tl.constexpr = not MASKED and not HAS_SOFTCAP
    s0 = _tma_scores(q, desc_k, table, n0, col, q_pos, hi, scale_log2, softcap_mul,
                     softcap_log2, sliding_window, block_size, PIECE, MASKED, HAS_WINDOW,
                     HAS_SOFTCAP)
    row_max = tl.max(s0, axis=1)
    if PIECES == 2:
        s1 = _tma_scores(q, desc_k, table, n0 + PIECE, col, q_pos, hi, scale_log2,
                         softcap_mul, softcap_log2, sliding_window, block_size, PIECE, MASKED,
                         HAS_WINDOW, HAS_SOFTCAP)
        row_max = tl.maximum(row_max, tl.max(s1, axis=1))
    if FAST:
        row_max = row_max * scale_log2
    m_new = tl.maximum(m_i, row_max)
    m_ref = m_new
    if HAS_WINDOW:
        # A row may see nothing yet: keep exp2 away from (-inf) - (-inf). (Causal alone,
        # every row sees a key in its first tile.)
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.math.exp2(m_i - m_ref)
    acc = acc * alpha[:, None]
    acc, row_sum = _tma_values(acc, s0, m_ref, desc_v, table, n0, col, hi, scale_log2,
                               block_size, PIECE, FAST, TAIL)
    if PIECES == 2:
        acc, row_sum1 = _tma_values(acc, s1, m_ref, desc_v, table, n0 + PIECE, col, hi,
                                    scale_log2, block_size, PIECE, FAST, TAIL)
        row_sum += row_sum1
    return acc, m_new, l_i * alpha + row_sum


@triton.jit
def _prefill_attention_tma_kernel(
        q_ptr, desc_k, desc_v, bt_ptr, tiles_ptr, out_ptr,
        stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, scale_log2, block_size,
        sliding_window, softcap_mul, softcap_log2, v_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PIECE: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, Q_DESC: tl.constexpr):
    """``_prefill_attention_kernel`` with K/V tiles copied by TMA from the cache viewed as
    ``[num_blocks * block_size, Hkv * D]`` (``desc_k``/``desc_v``, ``[PIECE, D]`` boxes).
    ``Q_DESC``: ``q_ptr`` is a descriptor of the queries as ``[T, H * D]`` (``[BLOCK_M, D]``
    boxes; rows of other requests, or zeros past the end, fill a partial tile and are never
    stored), else a pointer."""
    PIECES: tl.constexpr = BLOCK_N // PIECE
    head = tl.program_id(0)
    req, q_row, first_pos, hi, q_pos, q_rows, is_query = _query_tile(
        tiles_ptr, tl.program_id(1), BLOCK_M)
    if req < 0:
        return
    d = tl.arange(0, HEAD_DIM)
    io_mask = is_query[:, None]
    if Q_DESC:
        q = q_ptr.load([q_row, head * HEAD_DIM])
    else:
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=io_mask, other=0.0)
    col = (head // GROUP) * HEAD_DIM
    table = bt_ptr + req * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_WINDOW:
        # Every tile is masked, starting at the tile of the first query's first key.
        full_end = tl.maximum(first_pos - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
    else:
        # Tiles whose last key is at or before the tile's first query need no mask.
        full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _tma_tile(
                acc, m_i, l_i, q, q_pos, desc_k, desc_v, table, col, n0, hi, block_size,
                sliding_window, scale_log2, softcap_mul, softcap_log2, PIECE, PIECES, False,
                False, False, HAS_SOFTCAP)
    # Masked tiles; the last one, if it reaches past the sequence, zeroes those values.
    tail = hi // BLOCK_N * BLOCK_N
    for n0 in range(full_end, tail, BLOCK_N):
        acc, m_i, l_i = _tma_tile(
            acc, m_i, l_i, q, q_pos, desc_k, desc_v, table, col, n0, hi, block_size,
            sliding_window, scale_log2, softcap_mul, softcap_log2, PIECE, PIECES, True,
            False, HAS_WINDOW, HAS_SOFTCAP)
    if tail < hi:
        acc, m_i, l_i = _tma_tile(
            acc, m_i, l_i, q, q_pos, desc_k, desc_v, table, col, tail, hi, block_size,
            sliding_window, scale_log2, softcap_mul, softcap_log2, PIECE, PIECES, True,
            True, HAS_WINDOW, HAS_SOFTCAP)
    out = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def _launch_config(dtype: torch.dtype, head_dim: int, max_query_len: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by a size heuristic."""
    if is_interpreter():
        return 16, 16, 4, 1
    # Measured on H100 (bf16, D=128, 4x4096 causal): 256x64 tiles with 8 warps reach
    # ~350 TFLOP/s, 128x64 ~280, 128x128 ~305.
    block_m = min(256, max(16, next_power_of_2(max_query_len)))
    if dtype == torch.float32 or head_dim > 128:
        return min(block_m, 64), 32, 4, 2
    return block_m, 64, 8 if block_m >= 128 else 4, 3


def _tma_launch_config(max_query_len: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the TMA kernel."""
    return (128 if max_query_len >= 128 else 64), 64, 4, 3


def _has_tma(device: torch.device) -> bool:
    return capability(device) >= (9, 0)


def uses_tma(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             max_query_len: int, attention_stride: int | None = None) -> bool:
    """Whether ``prefill_attention`` reads K/V through the TMA kernel: a CUDA GPU of compute
    capability 9.0+, a contiguous 16-bit cache in the query's dtype with blocks of at least
    ``_TMA_MIN_BLOCK`` tokens, a head dim of 64 or 128, query chunks of 64+ tokens, no
    strided pattern, ``GRIDLLM_PREFILL_TMA`` on."""
    return (PREFILL_TMA and TensorDescriptor is not None and query.is_cuda
            and not is_interpreter() and _has_tma(query.device)
            and query.dtype in (torch.float16, torch.bfloat16)
            and key_cache.dtype == query.dtype and attention_stride is None
            and query.shape[2] in (64, 128) and key_cache.shape[1] >= _TMA_MIN_BLOCK
            and max_query_len >= 64 and key_cache.is_contiguous()
            and value_cache.is_contiguous() and key_cache.data_ptr() % 16 == 0
            and value_cache.data_ptr() % 16 == 0)


def _launch_tma(query, key_cache, value_cache, block_tables, out, scale, sliding_window,
                softcap_mul, softcap_log2, has_softcap, v_scale, max_query_len, launch,
                tiles_of):
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_blocks, block_size, num_kv_heads = key_cache.shape[:3]
    block_m, block_n, num_warps, num_stages = launch or _tma_launch_config(max_query_len)
    piece = min(block_size, block_n)
    if block_n % piece or block_n // piece > 2:
        raise ValueError(f"launch BLOCK_N must be at most twice the cache block "
                         f"({block_size}) on the TMA path, got {block_n}.")
    rows = num_blocks * block_size, num_kv_heads * head_dim
    desc_k, desc_v = (TensorDescriptor.from_tensor(c.view(rows), [piece, head_dim])
                      for c in (key_cache, value_cache))
    tiles = tiles_of(block_m)
    # The query tile by TMA too where its rows are whole 16-byte units apart (measured
    # 455 against 435 TFLOP/s for pointer loads on the H200, 4 x 4096).
    q_desc = (query.stride(1) == head_dim and query.stride(0) * query.element_size() % 16 == 0
              and query.data_ptr() % 16 == 0)
    q_arg = query
    if q_desc:
        q_arg = TensorDescriptor(query, [query.shape[0], num_heads * head_dim],
                                 [query.stride(0), 1], [block_m, head_dim])
    _prefill_attention_tma_kernel[(num_heads, tiles.shape[0])](
        q_arg, desc_k, desc_v, block_tables, tiles, out,
        query.stride(0), query.stride(1), block_tables.stride(0), out.stride(0),
        out.stride(1), float(scale) * _LOG2E, block_size,
        sliding_window if sliding_window is not None else 0,
        softcap_mul, softcap_log2, float(v_scale), GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, PIECE=piece, Q_DESC=q_desc,
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=has_softcap,
        num_warps=num_warps, num_stages=num_stages)
    return out


def attend_one_token_requests(query: torch.Tensor, key_cache: torch.Tensor,
                              value_cache: torch.Tensor, block_tables: torch.Tensor,
                              seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                              scale: float, out: torch.Tensor,
                              batch_cache: dict | None = None,
                              sliding_window: int | None = None,
                              logit_softcap: float | None = None,
                              attention_stride: int | None = None,
                              v_scale: float = 1.0,
                              max_seq_len: int | None = None) -> None:
    """Attention of a batch's requests of one query through the decode kernel, written to
    their rows of ``out`` (``[T + 1, H, D]``); every other request's output (zeros) goes
    to row ``T``, so its own rows are left for a prefill kernel. Sync-free: the decode
    kernel runs over all ``B`` requests, the others as padding rows (no keys). The
    gather and scatter rows, and the decode kernel's launch, are kept in ``batch_cache``
    for the step's other layers.
    ``scale`` includes an FP8 cache's ``k_scale``; ``max_seq_len``, a host-side bound of
    ``seq_lens``, sizes the decode kernel's split; the rest as in ``prefill_attention``."""
    num_tokens = query.shape[0]
    if out.shape[0] != num_tokens + 1:
        raise ValueError(f"out must have {num_tokens + 1} rows (one past the batch), got "
                         f"{out.shape[0]}.")

    def rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qsl = query_start_loc.to(torch.int64)
        first = qsl[:-1]
        one = qsl[1:] - first == 1
        return (first.clamp(max=num_tokens - 1), first.masked_fill(~one, num_tokens),
                seq_lens.masked_fill(~one, 0))

    src, dst, seq = kept(batch_cache, "one_token_requests", rows)
    decoded = paged_decode_attention(query.index_select(0, src), key_cache, value_cache,
                                     block_tables, seq, None, scale, sliding_window,
                                     logit_softcap=logit_softcap,
                                     attention_stride=attention_stride, v_scale=v_scale,
                                     max_seq_len=max_seq_len, check=False,
                                     batch_cache=batch_cache)
    out.index_copy_(0, dst, decoded)


def prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor,
                      query_start_loc: torch.Tensor, scale: float,
                      sliding_window: int | None = None,
                      max_query_len: int | None = None,
                      logit_softcap: float | None = None,
                      attention_stride: int | None = None,
                      k_scale: float = 1.0, v_scale: float = 1.0,
                      launch: tuple[int, int, int, int] | None = None,
                      batch_cache: dict | None = None,
                      split_one_token: bool | None = None,
                      one_token_prefix: int = 0,
                      out: torch.Tensor | None = None, *, check: bool = True,
                      max_seq_len: int | None = None,
                      chunk: bool | None = None) -> torch.Tensor:
    """Drop-in for ``torch_ref.paged_attention`` (any mix of prefill, extend and decode).

    Args:
        query: ``[T, H, D]`` packed queries, last dim contiguous.
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]``, query's dtype or
            ``float8_e4m3fn`` (read as ``k * k_scale``, ``v * v_scale``), with this step's
            KV already written.
        block_tables: ``[B, max_blocks]`` int32/int64.
        seq_lens: ``[B]`` cached + new tokens per request.
        query_start_loc: ``[B + 1]`` row offsets of each request's queries.
        scale: softmax scale.
        sliding_window: keys with ``pos_q - pos_k >= sliding_window`` are hidden.
        max_query_len: longest query chunk; pass it to avoid a device sync.
        logit_softcap: caps the scaled scores at ``c * tanh(s / c)`` (Gemma 2).
        attention_stride: the strided pattern with this stride (not with a window).
        k_scale, v_scale: the FP8 cache's scales (1.0 for other caches).
        launch: (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of the size heuristic,
            for tuning sweeps (of whichever kernel ``uses_tma`` picks).
        batch_cache: a dict that lives as long as this batch layout (a step's layers share
            it), where the kernels keep what they derive from it (``query_tiles``; built
            on each call without it).
        split_one_token: send requests of one query to the decode kernel
            (``attend_one_token_requests``) and only the rest to a prefill kernel (a
            step of continuous batching: decodes beside a prompt chunk; in a prefill
            kernel each takes a query tile, 128 rows in the Gluon kernel, that visits all
            its keys); default ``GRIDLLM_SPLIT_ONE_TOKEN`` (on; measured by
            benchmarks/prefill_mixed.py).
        one_token_prefix: with the split, how many requests the host knows to be the
            batch's one-query requests, all of them and all first (0: not known): the
            decode kernel then reads their queries and writes their outputs in place,
            rows ``[0, one_token_prefix)``, instead of a gather and a scatter.
        out: ``[T, H, D]`` in query's dtype, last dim contiguous (a view of a larger
            buffer is fine), to write into instead of a new tensor.
        check: validate the arguments; ``False`` only for a caller that has, for a batch
            of the same layout (the graphs cut at attention check a step's first call of
            each KV group: its other layers' calls differ only in their caches, allocated
            alike).
        max_seq_len: a bound of ``seq_lens`` known on the host (sizes the split of a short
            step's keys and the decode kernel's split of the one-query requests; default:
            the block table's width).
        chunk: run the prompt tokens through ``kernels.chunk_attention`` (query tiles of
            the GQA group's heads, the keys split across programs); default: a step of
            at most ``chunk_attention.MAX_TOKENS`` of them on a GPU
            (``chunk_attention.serves``). Not with a strided pattern.
    Returns:
        ``out`` or a new ``[T, H, D]`` tensor in query's dtype (rows outside every
        request's range are left unwritten).
    """
    if check:
        check_prefill_args(query, key_cache, value_cache, block_tables, seq_lens,
                           query_start_loc, k_scale, v_scale)
        check_pattern(sliding_window, attention_stride)
        if not 0 <= one_token_prefix <= seq_lens.shape[0]:
            raise ValueError(f"one_token_prefix must be in [0, {seq_lens.shape[0]}], got "
                             f"{one_token_prefix}.")
        if out is not None:
            check_tensor("out", out, dtypes=(query.dtype,), device=query.device,
                         last_dim_contiguous=True)
            check_shape("out", out, query.shape)
        if chunk and attention_stride is not None:
            raise ValueError("chunk=True cannot take the strided pattern (attention_stride).")
    split = SPLIT_ONE_TOKEN if split_one_token is None else split_one_token
    if out is not None:
        if split and not one_token_prefix:
            # The gathered split writes a row past the batch: through its own buffer.
            return out.copy_(prefill_attention(
                query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                scale, sliding_window, max_query_len, logit_softcap, attention_stride,
                k_scale, v_scale, launch, batch_cache, split_one_token, check=False,
                max_seq_len=max_seq_len, chunk=chunk))
    scale = float(scale) * k_scale
    softcap_mul, softcap_log2 = softcap_args(scale, logit_softcap)
    # With the split and the one-query requests' rows unknown on the host, a row past the
    # batch takes the decode kernel's outputs of the other requests (zeros; the prefill
    # kernel writes their rows next).
    padded = torch.empty((query.shape[0] + 1, *query.shape[1:]), dtype=query.dtype,
                         device=query.device) if split and not one_token_prefix else None
    if padded is not None:
        out = padded[:query.shape[0]]
    elif out is None:
        out = torch.empty_like(query)
    max_query_len = longest_query(query, query_start_loc, max_query_len)
    if max_query_len == 0:
        return out
    if split and one_token_prefix:
        first = slice(0, one_token_prefix)
        paged_decode_attention(query[first], key_cache, value_cache, block_tables[first],
                               seq_lens[first], None, scale, sliding_window,
                               logit_softcap=logit_softcap, attention_stride=attention_stride,
                               v_scale=v_scale, max_seq_len=max_seq_len, check=False,
                               out=out[first], batch_cache=batch_cache)
    elif split:
        attend_one_token_requests(query, key_cache, value_cache, block_tables, seq_lens,
                                  query_start_loc, scale, padded, batch_cache,
                                  sliding_window, logit_softcap, attention_stride, v_scale,
                                  max_seq_len)

    prefix = one_token_prefix if split else 0
    if chunk is None and launch is None and chunk_kernel.serves(
            query, attention_stride, query.shape[0] - prefix, True):  # beside Gluon
        chunk = True  # short enough for the chunk kernel whether or not Gluon could take it
    gluon = (not chunk and GLUON_PREFILL and launch is None and max_query_len >= 64
             and v_scale == 1.0
             and gluon_serves(query, key_cache, value_cache, sliding_window, logit_softcap,
                              attention_stride))
    if chunk is None:
        chunk = launch is None and chunk_kernel.serves(query, attention_stride,
                                                        query.shape[0] - prefix, gluon)
    if chunk:
        return chunk_kernel.chunk_attention(
            query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
            out, max_query_len, sliding_window, logit_softcap, v_scale, max_seq_len,
            skip_one_token=split, one_token_prefix=prefix, batch_cache=batch_cache)

    def tiles_of(block_m: int, longest_first: bool = False) -> torch.Tensor:
        return cached_query_tiles(batch_cache, query_start_loc, seq_lens, query.shape[0],
                                  max_query_len, block_m, skip_one_token=split,
                                  longest_first=longest_first)

    # (k_scale is in ``scale``; the Gluon kernel takes no v_scale, which a 16-bit cache as
    # served always has at 1.0: ``AttentionBackend.scales_for``.)
    if gluon:
        return gluon_prefill_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                       query_start_loc, scale, max_query_len, out,
                                       tiles_of(GLUON_BLOCK_M, GLUON_PERSISTENT),
                                       check=False)
    if uses_tma(query, key_cache, value_cache, max_query_len, attention_stride):
        return _launch_tma(query, key_cache, value_cache, block_tables, out, scale,
                           sliding_window, softcap_mul, softcap_log2,
                           logit_softcap is not None, v_scale, max_query_len, launch,
                           tiles_of)
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    block_m, block_n, num_warps, num_stages = launch or _launch_config(
        query.dtype, head_dim, max_query_len)
    tiles = tiles_of(block_m)
    _prefill_attention_kernel[(num_heads, tiles.shape[0])](
        query, key_cache, value_cache, block_tables, tiles, out,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        float(scale) * _LOG2E, block_size,
        sliding_window if sliding_window is not None else 0,
        softcap_mul, softcap_log2, float(v_scale), attention_stride or 1,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=max(16, next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=logit_softcap is not None,
        DOT_PRECISION=dot_precision(query.dtype), IS_STRIDED=attention_stride is not None,
        F16_DOTS=fp8_f16_dots(key_cache, query), num_warps=num_warps, num_stages=num_stages)
    return out
