"""Attention of a step's short query chunks over their cached contexts, split across the
keys (causal, GQA, sliding window, logit cap; a 16-bit or FP8 paged cache).

A step of a few dozen prompt tokens (the tail of a chunked prompt, a prompt beside a full
batch of decodes, a draft's tokens to verify) gives ``prefill_attention``'s kernels a
program per query head and query tile: 32 programs for one 64-token chunk of Llama-3-8B,
each walking the whole context alone, on a GPU of 132 SMs. Here a program takes ``QT``
consecutive queries of one request times the ``GROUP`` query heads that share a KV head,
``BLOCK_M = QT * GROUP`` rows of one ``tl.dot`` (so each key and value tile is read once
for all of them, as in ``paged_decode_attention``), and one of ``num_splits`` equal parts
of the keys those queries see; a second kernel merges the parts' softmaxes. A row masks
the keys past its own position (and outside its window).

The split count is a runtime argument (one compiled variant for every count: prefill
steps run eagerly, so nothing needs it fixed) picked on the host from the step's token
count and a bound of its context (``pick_num_splits``), without reading a device value.
``prefill_attention`` sends it the steps whose prompt tokens it ``serves``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels._launch import Launcher
from kernels._utils import (
    CHUNK_ATTENTION,
    dot_precision,
    is_interpreter,
    kept,
    next_power_of_2,
    num_sms,
)
from kernels.paged_decode_attention import _LOG2E, fp8_f16_dots, softcap_args
from kernels.prefill_args import _attend_tile, query_tiles

# Most splits of one query tile's keys (the merge reads them in one tile).
MAX_SPLITS = 32
# Fewer keys than this per split cost more in the merge than they save.
MIN_KEYS_PER_SPLIT = 64
# Programs a launch aims at per SM; no split once the tiles alone give three quarters of
# them. H100, Llama-3-8B's heads, one chunk after 1k-16k keys, us (splits as picked /
# half / twice): 16 tokens 16.4-52.5 with 8-16 splits / 20.5-83.9 / 15.8-41.3, so up to
# 32; 64 tokens after 4k keys 33 with 9 (5: 42, 17: 38); 256 tokens (128 programs) 78.5
# with 3, 144 with 1; 512 tokens (256 programs) over FP8 160 with 1, 204 with 2.
PROGRAMS_PER_SM = 2
# Rows of a program's product (queries x the group's heads): 64 rows, 64 keys an
# iteration, 4 warps, 2 stages were the fastest of 96 launches at 64 tokens after 4k keys
# (H100, 16-bit and FP8 caches).
BLOCK_ROWS = 64
# Prompt tokens of a step (past its leading one-query requests) up to which
# ``prefill_attention`` sends it here: H100, one chunk after 1k-16k keys, against the
# Triton prefill kernel (an FP8 cache) 2.2-11.7x at 16-256 tokens, 1.2-1.4x at 512;
# against the Gluon kernel (a 16-bit cache on Hopper, chunks of 64+ tokens) 1.35-1.9x at
# 64 tokens, 0.87-0.91x at 128, 0.35-0.41x at 512.
MAX_TOKENS = 512
MAX_TOKENS_BESIDE_GLUON = 64


@triton.jit(do_not_specialize=["num_splits"])
def _chunk_attention_kernel(
        q_ptr, kc_ptr, vc_ptr, bt_ptr, tiles_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
        stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
        stride_ot, stride_oh, scale_log2, block_size, sliding_window,
        softcap_mul, softcap_log2, v_scale, num_splits,
        GROUP: tl.constexpr, QT: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        F16_DOTS: tl.constexpr = False):
    slot = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    tile = tiles_ptr + 4 * slot
    req = tl.load(tile).to(tl.int64)
    if req < 0:
        return
    q_row = tl.load(tile + 1)
    first_pos = tl.load(tile + 2)
    seq_len = tl.load(tile + 3)
    # Row r: query first_pos + r // GROUP, head kv_head * GROUP + r % GROUP.
    r = tl.arange(0, BLOCK_M)
    t = r // GROUP
    q_pos = first_pos + t
    is_query = (t < QT) & (q_pos < seq_len)
    heads = kv_head * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + (q_row + t).to(tl.int64)[:, None] * stride_qt
                + heads[:, None] * stride_qh + d[None, :],
                mask=is_query[:, None] & dmask[None, :], other=0.0)
    if F16_DOTS:  # an FP8 cache under a bfloat16 query (see paged_decode_attention)
        q = q.to(tl.float16)
    # The keys any of the tile's queries sees, [lo, hi), in num_splits parts of whole
    # key tiles.
    hi = tl.minimum(first_pos + QT, seq_len)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first_pos - sliding_window + 1, 0)
    per_split = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, hi)
    table = bt_ptr + req * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        # Keys past the split's end masked as past the sequence.
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, kc_ptr, vc_ptr, table, kv_head, n0, end, block_size,
            sliding_window, stride_cb, stride_ct, stride_ch, scale_log2, softcap_mul,
            softcap_log2, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_WINDOW, HAS_SOFTCAP,
            DOT_PRECISION)
    acc = acc * v_scale
    if num_splits == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + (q_row + t).to(tl.int64)[:, None] * stride_ot
                 + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=is_query[:, None] & dmask[None, :])
    else:
        part = ((slot * tl.num_programs(1) + kv_head) * BLOCK_M + r) * num_splits + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc,
                 mask=dmask[None, :])
        tl.store(part_ml_ptr + part * 2, m_i)
        tl.store(part_ml_ptr + part * 2 + 1, l_i)


@triton.jit(do_not_specialize=["num_splits"])
def _chunk_merge_kernel(tiles_ptr, part_acc_ptr, part_ml_ptr, out_ptr, stride_ot, stride_oh,
                        num_splits, GROUP: tl.constexpr, QT: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (query tile, query, KV head): the ``GROUP`` heads' parts merged."""
    slot = tl.program_id(0)
    t = tl.program_id(1)
    kv_head = tl.program_id(2).to(tl.int64)
    tile = tiles_ptr + 4 * slot
    req = tl.load(tile)
    q_row = tl.load(tile + 1)
    first_pos = tl.load(tile + 2)
    seq_len = tl.load(tile + 3)
    if (req < 0) | (first_pos + t >= seq_len):
        return
    g = tl.arange(0, BLOCK_G)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    smask = s < num_splits
    rows = t * GROUP + g
    part = ((slot * tl.num_programs(2) + kv_head) * BLOCK_M + rows)[:, None] * num_splits \
        + s[None, :]
    gs_mask = gmask[:, None] & smask[None, :]
    # Every load first, in one round trip to L2.
    acc = tl.load(part_acc_ptr + part[:, :, None] * HEAD_DIM + d[None, None, :],
                  mask=gs_mask[:, :, None] & (d[None, None, :] < HEAD_DIM), other=0.0)
    m = tl.load(part_ml_ptr + part * 2, mask=gs_mask, other=float("-inf"))
    l_part = tl.load(part_ml_ptr + part * 2 + 1, mask=gs_mask, other=0.0)
    m_max = tl.max(m, axis=1)
    # A part that saw no key carries m = -inf.
    w = tl.where(m > float("-inf"),
                 tl.exp2(m - tl.where(m_max > float("-inf"), m_max, 0.0)[:, None]), 0.0)
    denom = tl.sum(l_part * w, axis=1)
    out = tl.sum(acc * w[:, :, None], axis=1) / tl.where(denom > 0, denom, 1.0)[:, None]
    heads = kv_head * GROUP + g
    tl.store(out_ptr + (q_row + t).to(tl.int64) * stride_ot + heads[:, None] * stride_oh
             + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None] & (d[None, :] < HEAD_DIM))


def serves(query: torch.Tensor, attention_stride: int | None, num_tokens: int,
           beside_gluon: bool = False) -> bool:
    """Whether ``prefill_attention`` sends a step here by default: a CUDA GPU (not the
    interpreter), no strided pattern and at most ``MAX_TOKENS`` prompt tokens
    (``num_tokens``: the step's tokens past its leading one-query requests;
    ``MAX_TOKENS_BESIDE_GLUON`` where the Gluon prefill kernel would take the step),
    unless ``GRIDLLM_CHUNK_ATTENTION=0``."""
    limit = MAX_TOKENS_BESIDE_GLUON if beside_gluon else MAX_TOKENS
    return (CHUNK_ATTENTION and query.is_cuda and not is_interpreter()
            and attention_stride is None and 0 < num_tokens <= limit)


def block_rows(group: int) -> int:
    """Rows of a program's product for a GQA group of ``group`` query heads."""
    return max(BLOCK_ROWS, next_power_of_2(group))


def pick_num_splits(num_tokens: int, queries_per_tile: int, num_kv_heads: int,
                    max_context: int, device: torch.device) -> int:
    """Parts of each query tile's keys: none once the tiles give three quarters of
    ``PROGRAMS_PER_SM`` programs an SM, else enough for all of them, at most
    ``MAX_SPLITS`` and at least ``MIN_KEYS_PER_SPLIT`` keys of ``max_context`` (a
    host-side bound) each."""
    programs = max(1, triton.cdiv(num_tokens, queries_per_tile) * num_kv_heads)
    target = PROGRAMS_PER_SM * num_sms(device)
    if 4 * programs >= 3 * target:
        return 1
    return max(1, min(triton.cdiv(target, programs), MAX_SPLITS,
                      max_context // MIN_KEYS_PER_SPLIT))


class _Plan(NamedTuple):
    """What a step's layers share: the query tiles, the split count, the parts' buffers
    (the layers run one after another on the stream) and the two launches' grids and
    launchers (their compile-time arguments; after the first layer they may launch the
    compiled kernels directly, ``kernels._launch``). Built once a step: a short step's
    host time per layer is what bounds it (H100, 64-token steps of Llama-3-8B under graphs
    cut at attention)."""
    tiles: torch.Tensor
    num_splits: int
    part_acc: torch.Tensor | None
    part_ml: torch.Tensor | None
    grid: tuple[int, int, int]
    merge_grid: tuple[int, int, int]
    attend: Launcher
    merge: Launcher


def _plan(query: torch.Tensor, key_cache: torch.Tensor, block_tables: torch.Tensor,
          seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
          sliding_window: int | None, logit_softcap: float | None, max_seq_len: int | None,
          skip_one_token: bool, prefix: int, num_splits: int | None,
          launch: tuple[int, int, int, int] | None) -> _Plan:
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    if launch is None:
        # Half the keys an iteration where a key tile's bytes double (float32, head dims
        # past 128), as the prefill kernel's launch does: the same shared memory a stage.
        wide = query.dtype == torch.float32 or head_dim > 128
        launch = ((max(16, next_power_of_2(group)), 16, 4, 1) if is_interpreter()
                  else (block_rows(group), 32 if wide else 64, 4, 2))
    rows, block_n, num_warps, num_stages = launch
    if rows < group or rows & (rows - 1):
        raise ValueError(f"launch rows must be a power of two of at least the GQA group "
                         f"({group}), got {rows}.")
    queries_per_tile = rows // group
    max_context = block_tables.shape[1] * block_size
    if max_seq_len is not None:
        max_context = min(max_context, max_seq_len)
    if sliding_window is not None:
        max_context = min(max_context, sliding_window + queries_per_tile)
    if num_splits is None:
        num_splits = pick_num_splits(num_tokens - prefix, queries_per_tile, num_kv_heads,
                                     max_context, query.device)
    tiles = query_tiles(query_start_loc, seq_lens, num_tokens - prefix, max_query_len,
                        queries_per_tile, skip_one_token=skip_one_token, first_request=prefix)
    slots = tiles.shape[0]
    part_acc = part_ml = None
    if num_splits > 1:
        parts = slots * num_kv_heads * rows * num_splits
        part_acc = torch.empty(parts, head_dim, dtype=torch.float32, device=query.device)
        part_ml = torch.empty(parts, 2, dtype=torch.float32, device=query.device)
    block_d = max(16, next_power_of_2(head_dim))
    shared = dict(GROUP=group, QT=queries_per_tile, HEAD_DIM=head_dim, BLOCK_D=block_d,
                  BLOCK_M=rows)
    return _Plan(
        tiles, num_splits, part_acc, part_ml, (slots, num_kv_heads, num_splits),
        (slots, queries_per_tile, num_kv_heads),
        Launcher(_chunk_attention_kernel, **shared, BLOCK_N=block_n,
                 HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=logit_softcap is not None,
                 DOT_PRECISION=dot_precision(query.dtype),
                 F16_DOTS=fp8_f16_dots(key_cache, query), num_warps=num_warps,
                 num_stages=num_stages),
        Launcher(_chunk_merge_kernel, **shared, BLOCK_G=next_power_of_2(group),
                 BLOCK_S=next_power_of_2(max(MAX_SPLITS, num_splits)), num_warps=4))


def chunk_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, out: torch.Tensor,
                    max_query_len: int, sliding_window: int | None = None,
                    logit_softcap: float | None = None, v_scale: float = 1.0,
                    max_seq_len: int | None = None, skip_one_token: bool = False,
                    one_token_prefix: int = 0, batch_cache: dict | None = None,
                    num_splits: int | None = None,
                    launch: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """The attention of the batch's requests past its first ``one_token_prefix`` (those
    of one query too unless ``skip_one_token``), written to their rows of ``out``;
    arguments as in ``prefill_attention``, which checks them (``scale`` includes an FP8
    cache's ``k_scale``). ``max_seq_len``: a host-side bound of ``seq_lens`` (default
    the block table's width). ``batch_cache``: where the step's plan is kept for its
    other layers. ``num_splits``, ``launch`` (rows of a program's product, keys per
    iteration, warps, stages): overrides for tests and sweeps."""
    if (query.shape[0] <= one_token_prefix or seq_lens.shape[0] <= one_token_prefix
            or max_query_len == 0):
        return out
    key = ("chunk_plan", one_token_prefix, skip_one_token, sliding_window,
           logit_softcap is None, query.dtype, key_cache.dtype, key_cache.shape[1:],
           num_splits, launch)
    plan = kept(batch_cache, key, lambda: _plan(
        query, key_cache, block_tables, seq_lens, query_start_loc, max_query_len,
        sliding_window, logit_softcap, max_seq_len, skip_one_token, one_token_prefix,
        num_splits, launch))
    softcap_mul, softcap_log2 = softcap_args(scale, logit_softcap)
    part_acc = out if plan.part_acc is None else plan.part_acc
    part_ml = out if plan.part_ml is None else plan.part_ml
    # (Each tensor's strides in one call: this runs for every layer of a short step.)
    q_stride, kc_stride, out_stride = query.stride(), key_cache.stride(), out.stride()
    plan.attend(
        plan.grid, query, key_cache, value_cache, block_tables, plan.tiles, out, part_acc,
        part_ml, q_stride[0], q_stride[1], kc_stride[0], kc_stride[1], kc_stride[2],
        block_tables.stride(0), out_stride[0], out_stride[1], float(scale) * _LOG2E,
        key_cache.shape[1], sliding_window if sliding_window is not None else 0,
        softcap_mul, softcap_log2, float(v_scale), plan.num_splits)
    if plan.num_splits > 1:
        plan.merge(plan.merge_grid, plan.tiles, part_acc, part_ml, out, out_stride[0],
                   out_stride[1], plan.num_splits)
    return out
