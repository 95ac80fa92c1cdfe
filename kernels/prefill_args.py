"""What the prefill attention kernels share (``prefill_attention``, and the Gluon kernel of
``gluon_prefill_attention`` and the chunk kernel of ``chunk_attention``, which
``prefill_attention`` dispatches to): argument checks, the list of a batch's query tiles
their grids take, and one key tile's step of the Triton kernels' online softmax."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import INDEX_DTYPES, check_tensor, is_interpreter, kept
from kernels.paged_decode_attention import _check_paged_args, _scores


def check_prefill_args(query: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                       k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """ValueError or TypeError naming the argument unless the batch is one
    ``prefill_attention`` takes (arguments as there)."""
    _check_paged_args(query, key_cache, value_cache, block_tables, seq_lens, k_scale, v_scale)
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=INDEX_DTYPES,
                 device=query.device, contiguous=True)
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError(f"query_start_loc must have {seq_lens.shape[0] + 1} entries, "
                         f"got {query_start_loc.shape[0]}.")


def longest_query(query: torch.Tensor, query_start_loc: torch.Tensor,
                  max_query_len: int | None) -> int:
    """The longest query chunk, 0 when there is nothing to attend: ``max_query_len``, else
    read from ``query_start_loc`` (a device sync)."""
    if query_start_loc.shape[0] <= 1 or query.shape[0] == 0:
        return 0
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    return max(max_query_len, 0)


# Requests a program of ``_query_tiles_kernel`` takes at a time (it walks all of them).
_TILES_BLOCK_B = 256
# Whether CUDA batches get their query tiles from ``_query_tiles_kernel`` (False: the torch
# ops, as on the CPU; for an A/B in one process, benchmarks/switch_ab.py).
TILES_KERNEL = True
# Whether the longest-first order runs every other run of tiles that visit as many keys
# backwards (request order reversed), so a run starts on the requests whose keys the run
# before ended on, still in L2. On a short uniform batch (64 x 256) longest first runs all
# second tiles and then all first ones, by when the first key tile (which both read) has
# left L2: Nsight Compute (H100, 2026-12-07) saw that cost, and request order gained 6%
# there but lost 15% at 16 x 1,024. Measured (H100, 2026-12-08, blocks of 16 / 64): 64 x
# 256 175 / 175 TFLOP/s against 174 / 174, 16 x 1,024 407 / 406 against 399 / 395, and
# with whole-sector stores nothing beside them alone (197 / 208 against 197 / 209): off.
ALTERNATE_TIES = False


@triton.jit(do_not_specialize=["first_req", "num_reqs", "slots", "block_m", "skip_one"])
def _query_tiles_kernel(qsl_ptr, seq_ptr, rows_ptr, first_req, num_reqs, slots, block_m,
                        skip_one, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    """``query_tiles`` rows of requests ``[first_req, num_reqs)`` in one program (one
    launch where the torch ops take about thirty): each block of requests counts its
    tiles, places them after the blocks before (a running cumulative sum) and writes
    each request's rows, its latest tile first; then the slots past the last tile get
    -1. Request numbers and query rows are the whole batch's."""
    placed = tl.zeros((), dtype=tl.int64)
    for b0 in range(first_req, num_reqs, BLOCK_B):
        r = b0 + tl.arange(0, BLOCK_B)
        live = r < num_reqs
        start = tl.load(qsl_ptr + r, mask=live, other=0).to(tl.int64)
        num_q = tl.load(qsl_ptr + r + 1, mask=live, other=0).to(tl.int64) - start
        seq = tl.load(seq_ptr + r, mask=live, other=0).to(tl.int64)
        tiles = tl.where(live & ((skip_one == 0) | (num_q != 1)),
                         (num_q + block_m - 1) // block_m, 0)
        first = placed + tl.cumsum(tiles, axis=0) - tiles
        for t in range(0, tl.max(tiles, axis=0)):
            slot = first + t
            has = (t < tiles) & (slot < slots)
            m0 = (tiles - 1 - t) * block_m
            row = rows_ptr + slot * 4
            tl.store(row, r.to(tl.int32), mask=has)
            tl.store(row + 1, (start + m0).to(tl.int32), mask=has)
            tl.store(row + 2, (seq - num_q + m0).to(tl.int32), mask=has)
            tl.store(row + 3, seq.to(tl.int32), mask=has)
        placed += tl.sum(tiles, axis=0)
    for s0 in range(0, slots, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        empty = (s >= placed) & (s < slots)
        for c in tl.static_range(4):
            tl.store(rows_ptr + s * 4 + c, -1, mask=empty)


def _num_slots(num_tokens: int, num_reqs: int, max_query_len: int, block_m: int) -> int:
    return min(triton.cdiv(num_tokens, block_m) + num_reqs,
               num_reqs * triton.cdiv(max_query_len, block_m))


def launch_query_tiles(query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                       num_tokens: int, max_query_len: int, block_m: int,
                       skip_one_token: bool = False, first_request: int = 0) -> torch.Tensor:
    """``query_tiles`` (not ``longest_first``) by ``_query_tiles_kernel``, of the requests
    from ``first_request`` on (``num_tokens`` counts their queries; request numbers and
    rows stay the whole batch's)."""
    num_reqs = seq_lens.shape[0] - first_request
    slots = _num_slots(num_tokens, num_reqs, max_query_len, block_m)
    rows = torch.empty((slots, 4), dtype=torch.int32, device=seq_lens.device)
    if slots > 0:  # (the kernel reads both lists with unit strides)
        _query_tiles_kernel[(1,)](query_start_loc.contiguous(), seq_lens.contiguous(), rows,
                                  first_request, seq_lens.shape[0], slots, block_m,
                                  int(skip_one_token), BLOCK_B=_TILES_BLOCK_B, BLOCK_S=256,
                                  num_warps=4)
    return rows


def query_tiles(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int,
                max_query_len: int, block_m: int, longest_first: bool = False,
                skip_one_token: bool = False, first_request: int = 0,
                alternate_ties: bool | None = None) -> torch.Tensor:
    """The batch's query tiles of ``block_m`` queries as the prefill kernels launch them, a
    program per tile and head: ``[slots, 4]`` int32 rows of (request, first query row, its
    position, the request's sequence length), request by request, each request's latest
    (longest) tile first; rows past the last tile are -1. Device ops only (no sync):
    ``slots`` is a bound known on the host, ``ceil(num_tokens / block_m) + B`` or
    ``B * ceil(max_query_len / block_m)`` whichever is less, so a batch of one long chunk
    and many short ones launches about as many programs as it has tiles (a grid of every
    request times the longest chunk's tiles would launch mostly empty ones). A step's
    layers can share the rows (``cached_query_tiles``). With ``longest_first`` the tiles
    are ordered by the keys they visit, most first, over the whole batch (the Gluon
    kernel's persistent launch), and with ``alternate_ties`` (None: ``ALTERNATE_TIES``)
    every other run of tiles visiting as many keys backwards. With ``skip_one_token``
    requests of one query get no tile (the decode kernel takes them:
    ``prefill_attention``'s ``split_one_token``).
    ``first_request``: the tiles of the requests from that one on only (``num_tokens``
    counts their queries; request numbers and rows stay the whole batch's)."""
    if not longest_first and tiles_by_kernel(seq_lens):
        return launch_query_tiles(query_start_loc, seq_lens, num_tokens, max_query_len,
                                  block_m, skip_one_token, first_request)
    return query_tiles_by_torch(query_start_loc, seq_lens, num_tokens, max_query_len,
                                block_m, longest_first, skip_one_token, first_request,
                                alternate_ties)


def tiles_by_kernel(seq_lens: torch.Tensor) -> bool:
    """Whether ``_query_tiles_kernel`` builds a batch's tiles: on a GPU (in Triton's
    interpreter one call takes tens of milliseconds, so the CPU tests check the kernel
    against the torch ops directly and keep the ops elsewhere)."""
    return TILES_KERNEL and seq_lens.is_cuda and not is_interpreter()


def query_tiles_by_torch(query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                         num_tokens: int, max_query_len: int, block_m: int,
                         longest_first: bool = False, skip_one_token: bool = False,
                         first_request: int = 0,
                         alternate_ties: bool | None = None) -> torch.Tensor:
    """``query_tiles`` by torch ops (about thirty small ones): the persistent launch's
    longest-first order, CPU tensors, and the kernel's reference."""
    seq_lens = seq_lens[first_request:]
    num_reqs = seq_lens.shape[0]
    slots = _num_slots(num_tokens, num_reqs, max_query_len, block_m)
    qsl = query_start_loc[first_request:].to(torch.int64)
    num_q = qsl[1:] - qsl[:-1]
    tiles = (num_q + block_m - 1) // block_m
    if skip_one_token:
        tiles = tiles.masked_fill(num_q == 1, 0)
    ends = tiles.cumsum(0)
    slot = torch.arange(slots, device=qsl.device)
    req = torch.searchsorted(ends, slot, right=True).clamp_(max=num_reqs - 1)
    m0 = (ends[req] - 1 - slot) * block_m
    seq = seq_lens.to(torch.int64)[req]
    rows = torch.stack((req + first_request, qsl[req] + m0, seq - num_q[req] + m0, seq),
                       dim=1)
    empty = slot >= ends[-1]
    rows.masked_fill_(empty[:, None], -1)
    if longest_first:
        keys = torch.minimum(rows[:, 2] + block_m, rows[:, 3]).masked_fill_(empty, -1)
        order = torch.argsort(keys, descending=True, stable=True)
        if ALTERNATE_TIES if alternate_ties is None else alternate_ties:
            order = order[_alternate_runs(keys[order])]
        rows = rows[order]
    return rows.to(torch.int32)


def _alternate_runs(keys: torch.Tensor) -> torch.Tensor:
    """The gather that reverses every other run of equal ``keys`` (sorted, most first;
    the first run kept), by device ops (no sync). The empty slots' rows are all -1, so
    their order does not matter."""
    n = keys.shape[0]
    index = torch.arange(n, device=keys.device)
    starts = torch.ones(n, dtype=torch.bool, device=keys.device)
    starts[1:] = keys[1:] != keys[:-1]
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]
    first = torch.where(starts, index, 0).cummax(0).values
    last = torch.where(ends, index, n).flip(0).cummin(0).values.flip(0)
    flip = starts.cumsum(0) % 2 == 0
    return torch.where(flip, first + last - index, index)


def cached_query_tiles(batch_cache: dict | None, query_start_loc: torch.Tensor,
                       seq_lens: torch.Tensor, num_tokens: int, max_query_len: int,
                       block_m: int, skip_one_token: bool = False,
                       longest_first: bool = False,
                       alternate_ties: bool | None = None) -> torch.Tensor:
    """``query_tiles``, kept in ``batch_cache`` (a dict that lives as long as the batch
    layout: a step's layers share it) when one is given."""
    key = ("query_tiles", block_m, skip_one_token, longest_first, alternate_ties)
    return kept(batch_cache, key, lambda: query_tiles(
        query_start_loc, seq_lens, num_tokens, max_query_len, block_m,
        longest_first=longest_first, skip_one_token=skip_one_token,
        alternate_ties=alternate_ties))


@triton.jit
def _attend_tile(acc, m_i, l_i, q, q_pos, kc_ptr, vc_ptr, table, kv_head, n0, hi,
                 block_size, sliding_window, stride_cb, stride_ct, stride_ch,
                 scale_log2, softcap_mul, softcap_log2, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, attention_stride=1,
                 IS_STRIDED: tl.constexpr = False):
    """One key tile, ``[n0, n0 + BLOCK_N)`` (keys from ``hi`` on are masked), of the online
    softmax of the rows at positions ``q_pos`` over KV head ``kv_head``: the new ``acc``,
    row maxima and sums. ``MASKED``: each row hides the keys past its position (and
    outside its window or strided pattern)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    nmask = pos < hi
    blk = tl.load(table + pos // block_size, mask=nmask, other=0).to(tl.int64)
    kv_off = blk * stride_cb + (pos % block_size).to(tl.int64) * stride_ct + kv_head * stride_ch
    kv_mask = nmask[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(kc_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    s = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), scale_log2, softcap_mul,
                softcap_log2, HAS_SOFTCAP)
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & nmask[None, :]
        if HAS_WINDOW:
            visible = visible & (q_pos[:, None] - pos[None, :] < sliding_window)
        if IS_STRIDED:
            dist = q_pos[:, None] - pos[None, :]
            visible = visible & ((dist < attention_stride) | (dist % attention_stride == 0))
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = m_new
    if MASKED:
        # A row may see nothing yet (window): keep exp2 away from (-inf) - (-inf).
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i
