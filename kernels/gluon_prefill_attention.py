"""Prefill/extend attention over a 16-bit paged KV cache on Hopper, written in Gluon with
warp specialization (the FlashAttention-3 structure), for head dim 128.

Semantics as ``kernels.prefill_attention`` (causal, GQA, varlen requests whose queries are
their last tokens, all KV already in the cache). One program takes 128 queries of one
query head; its warps split into three partitions (``gl.warp_specialize``):

- a load warp issues every bulk copy (TMA): the program's query tile once, then each key
  tile and value tile of ``BLOCK_N`` keys into a ring of ``STAGES`` shared-memory buffers.
  TMA has no row gather, so a tile is one copy per cache block it spans (``PIECE`` rows,
  a block of 16 tokens too) and per 64-column half of the head (128-byte swizzle allows
  boxes of at most 128 bytes a row); each copy lands in a row slice of the tile, which
  the swizzle leaves valid for slices of 8+ rows. The block numbers of the next tile are
  one load (a lane a piece) issued before the wait for a free stage, so no copy waits on a
  load of its own (placed just before each copy, that was 16 round trips a 128-key tile at
  blocks of 16). "full" mbarriers count the bytes in, "empty" mbarriers count the two
  consumers out;
- two consumer warpgroups own 64 query rows each. Per key tile: ``S = Q K^T`` and
  ``O += P V`` on the tensor cores (``wgmma``; Q, K and V read from shared memory, P from
  registers), online softmax with ``exp2`` in between.

Each consumer issues the next tile's scores ``S_{j+1} = Q K_{j+1}^T`` and this tile's
``O += P_j V_j`` together, waits for the scores only, runs their softmax while ``P_j V_j``
is in flight, then waits for it and rescales the accumulator (FlashAttention-3's
intra-warpgroup overlap, ``OVERLAP``). The probabilities travel to the next step in
float32 and become the product's operand there, so no register of a product in flight is
touched (ptxas would otherwise serialize every ``wgmma``, warning C7514); and since ptxas
hoists a wait for products above register-only work, the softmax stores its row sums to
shared memory just before the wait (a store it does not move the wait above). A pair of
"turn" mbarriers makes the two warpgroups issue their products alternately (ping-pong),
so one's softmax also runs under the other's products. ``OVERLAP=False`` (for sweeps)
waits for both products before the softmax.

Key tiles wholly at or before the program's first query position run without a mask; the
others mask ``pos_k <= pos_q``, which also hides keys past the sequence. Cache rows past
the sequence may hold anything, and ``0 * NaN`` is NaN, so the consumers zero those rows
of the last value tile in shared memory before reading it.

Without the persistent launch the grid is a program per head and query tile of
``prefill_args.query_tiles``, a list of the batch's tiles built on the device (no sync)
once per step, request by request and each request's latest (longest) tile first. A
step of continuous batching mixes one long chunk with many one-token requests; a grid of
every request times the longest chunk's tiles launched mostly empty programs there (200
one-token requests beside a 2,048-token chunk: 93% of them), and each still set up its
224 KB of shared memory, its barriers and its three partitions before finding it had
nothing to do.

``persistent=True`` (the default, ``PERSISTENT``) launches a program per streaming
multiprocessor instead, each walking its items (query tile x head, the tiles longest
first, dealt in rounds that alternate direction over the programs); every partition walks
the same items, the ring's and the turns' phases counting on across them, and the load
warp brings an item's first key tile, then its query tile once both consumers have
released the last one's (the ``q_empty`` mbarrier), so the next item's first copies run
under the last one's P @ V and output store.

What it does not take (``kernels.prefill_attention`` keeps those cases): head dims other
than 128, float32 or FP8 caches, sliding windows, soft-capping, the strided pattern.

``prefill_attention`` dispatches query chunks of 64+ tokens to this kernel (and needs
``v_scale`` 1.0, which it does not take); ``GRIDLLM_GLUON_PREFILL=0`` turns that off. On an
H200 (2026-12-05) it passed its GPU tests, the prefill tests, end-to-end greedy parity
with transformers and the no-compilation-after-start checks with it dispatched; 4 x 4096
causal bf16 ran at 544 / 541 TFLOP/s over cache blocks of 16 / 64 in
``benchmarks/kernels.py`` (1.01x torch SDPA in that run; the Triton kernels 351 / 461),
and the launch sweep put 128-key tiles, three stages and the overlap first. On an H100
(2026-12-05) the persistent launch (added since) without the overlap came first, and is
the default (see docs/performance.md); on single prompts too (1 x 2,048 / 1 x 8,192
tokens from CUDA graphs: 77 / 933 us against 83 / 964 for a program per tile).
"""

from __future__ import annotations

import functools

import torch

from kernels._gluon import barrier, gl, gluon, runs_on
from kernels._utils import num_sms
from kernels.paged_decode_attention import _LOG2E
from kernels.prefill_args import check_prefill_args, longest_query, query_tiles

try:  # Hopper TMA and wgmma in Gluon (Triton 3.5+)
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - an older Triton: the callers keep other kernels
    TensorDescriptor = None
else:
    # Triton 3.5-3.6 name the TMA load async_copy_global_to_shared, later ones async_load.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

HEAD_DIM = 128
# Query rows a program takes, and per consumer warpgroup.
BLOCK_M = 128
HALF_M = 64
# Default launch, the best of benchmarks/attention_sweep.py --gluon-prefill on an H200 at
# cache blocks of 16 and 64 (with OVERLAP): keys per tile, ring buffers (three stages of
# 128-key K and V tiles plus the query tile are 224 KB of shared memory).
BLOCK_N = 128
STAGES = 3
# Whether a consumer runs the next tile's softmax while its own P @ V is in flight
# (FlashAttention-3's intra-warpgroup overlap) on top of the ping-pong between the two
# consumers; off: both products of a step are waited for before the softmax. With a program
# per item it helped (H200, 4 x 4096: 544 / 545 TFLOP/s at cache blocks of 16 / 64 against
# 533 / 537 without; H100: 538 / 540 against 527 / 528); with the persistent launch it did
# not (H100: 527 / 542 against 545 / 549, three stages), so it is off with that default.
OVERLAP = False
# Whether a program per SM walks the items (query tile x head) instead of a program per
# item: the load warp brings the next item's query and first key tiles while the consumers
# finish the last one's products and store its output. H100 (2026-12-05), 4 x 4096 causal
# bf16, three stages: 545 / 549 TFLOP/s at cache blocks of 16 / 64 against 538 / 540 for a
# program per item with the overlap (the best of those); a step of one 2,048-token chunk
# among 200 one-token requests 827 us against 888.
PERSISTENT = True
# The persistent launch's query tiles in shared memory: with 2, the load warp copies the
# next item's query tile as soon as it reaches that item's first key tile, instead of once
# the consumers have released the current item's (two tiles of 32 KB: fits beside two
# stages of 128-key tiles, not three). A program per item has one item: always 1. H100
# (2026-12-07), blocks of 16 / 64, with two stages: 64 x 256 175 / 177 TFLOP/s against
# 174 / 175 for two stages alone (173 / 173 served), and no gain at 4 x 4096 or
# 16 x 1,024, so 1.
QUERY_BUFFERS = 1
# Whether the persistent launch's consumers read the next item's row of the tile list
# before this item's work (its load's round trip then runs under the work) instead of
# after it. H100 (2026-12-07): 64 x 256 176 / 175 against 173 / 173, 16 x 1,024 384 / 390
# against 393 / 393: off.
NEXT_ROW = False
# Whether the consumers store the output in whole 32-byte sectors (``OUT_LAYOUT``: 8 bytes
# a thread, regrouped within each warp) instead of straight from the wgmma accumulator's
# layout (4 bytes a thread, half sectors, each sector two writes into L2: Nsight Compute
# counted 8.3 million sector writes for a 134 MB output on an H100, where cuDNN's SDPA
# makes 4.2 million; with whole sectors 4.2 million too). H100 (2026-12-08), blocks of
# 16 / 64, against the half-sector stores in turns: 64 x 256 197 / 209 TFLOP/s against
# 174 / 174, 16 x 1,024 430 / 435 against 399 / 395, 4 x 4096 558 / 561 against 540 / 546.
WHOLE_SECTORS = True
# Shared memory a block may have on Hopper (227 KB).
_MAX_SMEM = 232448
# Registers per thread: the kernel's limit over its 12 warps (a whole register file),
# the load warp's and the second consumer's; the first consumer gets what is left (240).
MAX_REGS = 168
LOAD_REGS = 24
CONSUMER_REGS = 240


@functools.cache
def _layouts(block_n: int, whole_sectors: bool = WHOLE_SECTORS) -> dict:
    """The kernel's register and shared-memory layouts for tiles of ``block_n`` keys (the
    output stored as ``OUT_LAYOUT`` with ``whole_sectors``, else as ``O_LAYOUT``)."""
    o_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                         instr_shape=[16, HEAD_DIM, 16])
    return dict(
        # wgmma accumulators of one warpgroup: S [64, block_n] and O [64, 128].
        S_LAYOUT=gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                           instr_shape=[16, block_n, 16]),
        O_LAYOUT=o_layout,
        # The output tile as stored with whole_sectors: O_LAYOUT's values regrouped within
        # each warp (by shuffles, no shared memory) so each thread holds 4 consecutive
        # columns of a row (an 8-byte store) and a row's four lanes 32 contiguous bytes, a
        # whole sector. In O_LAYOUT a thread holds 2 (4 bytes) and a row's four lanes 16
        # bytes, half a sector, so each sector reaches L2 as two partial writes. (8 columns
        # a thread, 16-byte stores, takes a shared-memory scratch that three stages of
        # 128-key tiles leave no room for.)
        OUT_LAYOUT=gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [8, 0], [0, 16], [0, 32], [0, 64]],
            lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[HALF_M, HEAD_DIM])
        if whole_sectors else o_layout,
        # 128-byte swizzle: a [rows, 128] tile is two [rows, 64] slabs of 128-byte rows,
        # so the same bytes read as [2 * rows, 64] are the TMA copies' destinations.
        SMEM=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        # The load warp's block numbers of a tile: a lane each.
        TABLE=gl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[1],
                               order=[0]),
        # [BLOCK_N, 128] value tile for zeroing rows: 16-byte vectors a thread.
        V_ZERO=gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                warps_per_cta=[4, 1], order=[1, 0]),
        # Each consumer's row sums in shared memory (see _scores_then_values).
        SINK=gl.SwizzledSharedLayout(1, 1, 1, order=[0]),
    )


if gluon is not None and TensorDescriptor is not None:
    _D = gl.constexpr(HEAD_DIM)
    _HALF_D = gl.constexpr(HEAD_DIM // 2)

    if hasattr(gl.shared_memory_descriptor, "reinterpret"):  # Triton 3.7+
        @gluon.jit
        def _as_pieces(tile_ring, SMEM: gl.constexpr):
            """The ring ``[STAGES, BLOCK_N, 128]`` as ``[STAGES, 2 * BLOCK_N, 64]``."""
            shape: gl.constexpr = [tile_ring.shape[0], 2 * tile_ring.shape[1], _HALF_D]
            return tile_ring.reinterpret(tile_ring.dtype, shape, SMEM)
    else:
        @gluon.jit
        def _as_pieces(tile_ring, SMEM: gl.constexpr):
            """The ring ``[STAGES, BLOCK_N, 128]`` as ``[STAGES, 2 * BLOCK_N, 64]``."""
            shape: gl.constexpr = [tile_ring.shape[0], 2 * tile_ring.shape[1], _HALF_D]
            return tile_ring._reinterpret(tile_ring.dtype, shape, SMEM)

    _HALF_M = gl.constexpr(HALF_M)
    _BLOCK_M = gl.constexpr(BLOCK_M)

    @gluon.jit
    def _tile_blocks(table, n0, last_block, BLOCK_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                     PIECE: gl.constexpr, TABLE: gl.constexpr):
        """The cache block of each ``PIECE``-key piece of the tile at key ``n0``, in one
        load (keys past the sequence read its last block: they are masked)."""
        p = gl.arange(0, BLOCK_N // PIECE, layout=TABLE)
        return gl.load(table + gl.minimum((n0 + p * PIECE) // BLOCK_SIZE, last_block))

    @gluon.jit
    def _copy_tile(desc, pieces, bar, blocks, n0, kv_col, BLOCK_SIZE: gl.constexpr,
                   BLOCK_N: gl.constexpr):
        """Bulk copies of keys ``n0 .. n0 + BLOCK_N`` (one per cache block in ``blocks``
        and half head) into ``pieces`` (the stage's tile as ``[2 * BLOCK_N, 64]``: half 0's
        rows, then half 1's)."""
        PIECE: gl.constexpr = desc.block_type.shape[0]
        idx = gl.arange(0, BLOCK_N // PIECE, layout=blocks.type.layout)
        for p in gl.static_range(BLOCK_N // PIECE):
            blk = gl.sum(gl.where(idx == p, blocks, 0), axis=0).to(gl.int32)
            row = blk * BLOCK_SIZE + (n0 + p * PIECE) % BLOCK_SIZE
            for h in gl.static_range(2):
                _tma_load(desc, [row, kv_col + h * _HALF_D], bar,
                          pieces.slice(h * BLOCK_N + p * PIECE, PIECE))

    @gluon.jit
    def _query_buffer(done, q_smem):
        """The query buffer of a program's item that follows ``done`` items with work, and
        the phase its barriers complete for that item (``q_smem``: two halves a buffer)."""
        BUFFERS: gl.constexpr = q_smem.shape[0] // 2
        if BUFFERS == 1:
            return 0, done & 1
        else:
            return done % BUFFERS, done // BUFFERS & 1

    @gluon.jit
    def _load_query(desc_q, q_smem, q_bar, buf, q_row, q_col):
        """Bulk copies of the item's query tile (two halves of 64 rows) into buffer ``buf``
        of ``q_smem``, completing ``q_bar``."""
        mbarrier.expect(q_bar, 2 * desc_q.block_type.nbytes)
        _tma_load(desc_q, [q_row, q_col], q_bar, q_smem.index(2 * buf))
        _tma_load(desc_q, [q_row + _HALF_M, q_col], q_bar, q_smem.index(2 * buf + 1))

    @gluon.jit
    def _load_item(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, q_empty, k_full,
                   k_empty, v_full, v_empty, table, q_row, q_col, kv_col, seq_len, num_tiles,
                   t, done, BLOCK_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, PERSISTENT: gl.constexpr, SMEM: gl.constexpr,
                   TABLE: gl.constexpr):
        """The load warp's copies for one item: its query tile, then its key and value
        tiles into the ring (``t``: tiles the program's earlier items put through it;
        ``done``: its earlier items with work). Persistent, the query tile follows the
        first key tile, once the consumers have released the previous item's."""
        if not PERSISTENT and num_tiles > 0:
            _load_query(desc_q, q_smem, q_bar.index(0), 0, q_row, q_col)
        k_pieces = _as_pieces(k_smem, SMEM)
        v_pieces = _as_pieces(v_smem, SMEM)
        tile_bytes: gl.constexpr = BLOCK_N * _D * 2
        PIECE: gl.constexpr = desc_k.block_type.shape[0]
        # (A request without keys has no tiles, but the first tile's numbers are read.)
        last_block = gl.maximum((seq_len - 1) // BLOCK_SIZE, 0)
        # Block numbers a tile ahead: each tile's copies wait on no load of their own.
        blocks = _tile_blocks(table, 0, last_block, BLOCK_SIZE, BLOCK_N, PIECE, TABLE)
        for j in range(num_tiles):
            g = t + j
            stage = g % STAGES
            # Fresh mbarriers count as having completed the phase before phase 0.
            phase = (g // STAGES & 1) ^ 1
            n0 = j * BLOCK_N
            blocks_next = _tile_blocks(table, n0 + BLOCK_N, last_block, BLOCK_SIZE, BLOCK_N,
                                       PIECE, TABLE)
            mbarrier.wait(k_empty.index(stage), phase)
            mbarrier.expect(k_full.index(stage), tile_bytes)
            _copy_tile(desc_k, k_pieces.index(stage), k_full.index(stage), blocks, n0,
                       kv_col, BLOCK_SIZE, BLOCK_N)
            if PERSISTENT:
                if j == 0:
                    # The first key tile is on its way (it needs only a free stage); the
                    # query tile waits for the consumers to release the last item's.
                    buf, phase_q = _query_buffer(done, q_smem)
                    mbarrier.wait(q_empty.index(buf), phase_q ^ 1)
                    _load_query(desc_q, q_smem, q_bar.index(buf), buf, q_row, q_col)
            mbarrier.wait(v_empty.index(stage), phase)
            mbarrier.expect(v_full.index(stage), tile_bytes)
            _copy_tile(desc_v, v_pieces.index(stage), v_full.index(stage), blocks, n0,
                       kv_col, BLOCK_SIZE, BLOCK_N)
            blocks = blocks_next

    @gluon.jit
    def _unmasked_tiles(first_pos, num_tiles, BLOCK_N: gl.constexpr):
        """Of an item's ``num_tiles`` key tiles, those whose last key is at or before its
        first query (``first_pos``): they need no mask. The last tile always takes one."""
        return gl.minimum((first_pos + 1) // BLOCK_N, num_tiles - 1)

    @gluon.jit
    def _tile_row(tiles_ptr, slot, BLOCK_N: gl.constexpr):
        """Slot ``slot`` of ``query_tiles`` in one load round trip: the request (0 for an
        empty slot), the first query row, its position, the sequence length, the key
        tiles to visit (0: an empty slot) and how many of them need no mask."""
        row = tiles_ptr + 4 * slot
        req = gl.load(row)
        q_row = gl.load(row + 1)
        first_pos = gl.load(row + 2)
        seq_len = gl.load(row + 3)
        hi = gl.minimum(first_pos + _BLOCK_M, seq_len)
        num_tiles = gl.where(req >= 0, gl.cdiv(hi, BLOCK_N), 0)
        return (gl.maximum(req, 0), q_row, first_pos, seq_len, num_tiles,
                _unmasked_tiles(first_pos, num_tiles, BLOCK_N))

    @gluon.jit
    def _persistent_item(tiles_ptr, k, num_items, num_heads, BLOCK_N: gl.constexpr):
        """This program's item of round ``k`` (items: the slots of ``query_tiles``, longest
        first, times the heads, heads fastest): ``_tile_row``'s values and the head. Even
        rounds give item ``k P + p`` to program ``p`` of ``P``, odd rounds run backwards,
        so each program's long and short items even out; past the last item: no tiles."""
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        idx = k * nprog + gl.where(k % 2 == 0, pid, nprog - 1 - pid)
        valid = idx < num_items
        idx = gl.minimum(idx, num_items - 1)
        req, q_row, first_pos, seq_len, num_tiles, num_full = _tile_row(
            tiles_ptr, idx // num_heads, BLOCK_N)
        return (req, q_row, first_pos, seq_len, gl.where(valid, num_tiles, 0), num_full,
                idx % num_heads)

    @gluon.jit
    def _load_partition(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, q_empty,
                        k_full, k_empty, v_full, v_empty, bt_ptr, stride_bt, tiles_ptr, req,
                        q_row, head, seq_len, num_tiles, num_items, num_heads,
                        GROUP: gl.constexpr, BLOCK_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, PERSISTENT: gl.constexpr, SMEM: gl.constexpr,
                        TABLE: gl.constexpr):
        if PERSISTENT:
            t = num_items * 0
            done = num_items * 0
            for k in range(gl.cdiv(num_items, gl.num_programs(0))):
                req, q_row, first_pos, seq_len, num_tiles, num_full, head = _persistent_item(
                    tiles_ptr, k, num_items, num_heads, BLOCK_N)
                _load_item(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, q_empty,
                           k_full, k_empty, v_full, v_empty,
                           bt_ptr + req.to(gl.int64) * stride_bt, q_row, head * _D,
                           (head // GROUP) * _D, seq_len, num_tiles, t, done, BLOCK_SIZE,
                           BLOCK_N, STAGES, PERSISTENT, SMEM, TABLE)
                t += num_tiles
                done += gl.where(num_tiles > 0, 1, 0)
        else:
            _load_item(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, q_empty,
                       k_full, k_empty, v_full, v_empty, bt_ptr + req.to(gl.int64) * stride_bt,
                       q_row, head * _D, (head // GROUP) * _D, seq_len, num_tiles, 0, 0,
                       BLOCK_SIZE, BLOCK_N, STAGES, PERSISTENT, SMEM, TABLE)

    @gluon.jit
    def _probabilities(s, m_i, l_i, q_pos, n0, qk_scale, MASKED: gl.constexpr,
                       S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr):
        """Online softmax of one tile's raw scores ``s``: the probabilities (float32, in
        the scores' layout), the factor ``alpha`` (in the accumulator's row layout) the
        accumulator is to be rescaled by, the new row maxima and sums (log2 units). Every
        row sees key 0 in its first tile, so maxima are finite from then on."""
        if MASKED:
            cols = gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, S_LAYOUT))
            s = gl.where(cols[None, :] <= (q_pos - n0)[:, None], s, float("-inf"))
        # Scale and subtract in one fused multiply-add (-inf stays -inf: the scale is > 0).
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, gl.convert_layout(alpha, gl.SliceLayout(1, O_LAYOUT)), m_new, l_i

    @gluon.jit
    def _operand(p, dtype: gl.constexpr, O_LAYOUT: gl.constexpr):
        """Probabilities as P @ V's register operand."""
        return gl.convert_layout(p.to(dtype),
                                 gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT,
                                                     k_width=2))

    @gluon.jit
    def _softmax(s, acc, m_i, l_i, q_pos, n0, qk_scale, dtype: gl.constexpr,
                 MASKED: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr):
        """``_probabilities`` as P @ V's operand, with the accumulator rescaled: P, the
        accumulator, the row maxima and sums."""
        p, alpha, m_i, l_i = _probabilities(s, m_i, l_i, q_pos, n0, qk_scale, MASKED,
                                            S_LAYOUT, O_LAYOUT)
        return _operand(p, dtype, O_LAYOUT), acc * alpha[:, None], m_i, l_i

    @gluon.jit
    def _my_turn(turn, WG: gl.constexpr, section):
        """Wait until the other warpgroup has issued its products of the previous section
        (warpgroup 0 issues first: section ``k`` of warpgroup 1 follows section ``k`` of
        warpgroup 0, which follows section ``k - 1`` of warpgroup 1)."""
        mbarrier.wait(turn.index(WG), (section + 1 + WG) & 1)

    @gluon.jit
    def _values_then_scores(p, acc, q, k_smem, v_smem, k_full, k_empty, v_full, v_empty,
                            turn, j, t, done, WG: gl.constexpr, STAGES: gl.constexpr,
                            S_LAYOUT: gl.constexpr):
        """``acc + P_j V_j`` and ``S_{j+1} = Q K_{j+1}^T``, issued together on this
        warpgroup's turn and waited for together."""
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        g = t + j
        stage = g % STAGES
        nxt = (g + 1) % STAGES
        mbarrier.wait(v_full.index(stage), g // STAGES & 1)
        mbarrier.wait(k_full.index(nxt), (g + 1) // STAGES & 1)
        _my_turn(turn, WG, g + done + 1)
        acc = warpgroup_mma(p, v_smem.index(stage), acc, is_async=True)
        s = warpgroup_mma(q, k_smem.index(nxt).permute((1, 0)),
                          gl.zeros([_HALF_M, BLOCK_N], gl.float32, S_LAYOUT),
                          use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - WG))
        acc, s = warpgroup_mma_wait(0, deps=[acc, s])
        mbarrier.arrive(v_empty.index(stage))
        mbarrier.arrive(k_empty.index(nxt))
        return acc, s

    @gluon.jit
    def _scores_then_values(p, acc, m_i, l_i, q, q_pos, qk_scale, k_smem, v_smem, k_full,
                            k_empty, v_full, v_empty, turn, sink, j, t, done,
                            WG: gl.constexpr,
                            STAGES: gl.constexpr, MASKED: gl.constexpr,
                            S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr):
        """``S_{j+1} = Q K_{j+1}^T`` and ``acc + P_j V_j`` (``p``: tile ``j``'s float32
        probabilities, made the product's operand here) issued together on this
        warpgroup's turn; the softmax of ``S_{j+1}`` runs while ``P_j V_j`` does, then
        the accumulator is rescaled: tile ``j + 1``'s float32 probabilities, the
        accumulator, the row maxima and sums. (Carrying the probabilities to the next step
        in float32 leaves the operand's registers alone until the product is done, so
        ptxas has no reason to wait for it before the softmax.)"""
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        g = t + j
        stage = g % STAGES
        nxt = (g + 1) % STAGES
        p = _operand(p, k_smem.dtype, O_LAYOUT)
        mbarrier.wait(k_full.index(nxt), (g + 1) // STAGES & 1)
        mbarrier.wait(v_full.index(stage), g // STAGES & 1)
        _my_turn(turn, WG, g + done + 1)
        s = warpgroup_mma(q, k_smem.index(nxt).permute((1, 0)),
                          gl.zeros([_HALF_M, BLOCK_N], gl.float32, S_LAYOUT),
                          use_acc=False, is_async=True)
        acc = warpgroup_mma(p, v_smem.index(stage), acc, is_async=True)
        mbarrier.arrive(turn.index(1 - WG))
        # Products complete in issue order: one group left in flight is P_j V_j.
        s = warpgroup_mma_wait(1, deps=[s])
        mbarrier.arrive(k_empty.index(nxt))
        p_next, alpha, m_i, l_i = _probabilities(s, m_i, l_i, q_pos, (j + 1) * BLOCK_N,
                                                 qk_scale, MASKED, S_LAYOUT, O_LAYOUT)
        # ptxas hoists a wait for products above register-only work (here the whole
        # softmax) but not above a shared-memory store: storing the row sums, which need
        # every probability, keeps the softmax ahead of the wait. Nothing reads them.
        sink.store(l_i)
        acc, p = warpgroup_mma_wait(0, deps=[acc, p])
        mbarrier.arrive(v_empty.index(stage))
        return p_next, acc * alpha[:, None], m_i, l_i

    @gluon.jit
    def _zero_tail_values(v_tile, n0, seq_len, V_ZERO: gl.constexpr):
        """Zero the value rows of keys from ``seq_len`` on (the cache may hold NaN there;
        their probabilities are 0, but 0 * NaN is NaN)."""
        keys = n0 + gl.arange(0, v_tile.shape[0], layout=gl.SliceLayout(1, V_ZERO))
        v = v_tile.load(V_ZERO)
        v_tile.store(gl.where((keys < seq_len)[:, None], v, gl.zeros_like(v)))
        fence_async_shared()
        barrier()

    @gluon.jit
    def _consumer_partition(q_smem, k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full,
                            v_empty, turn, sinks, out_ptr, stride_ot, stride_oh, tiles_ptr,
                            q_row, head, first_pos, seq_len, num_tiles, num_full, num_items,
                            num_heads, qk_scale, WG: gl.constexpr, STAGES: gl.constexpr,
                            OVERLAP: gl.constexpr, PERSISTENT: gl.constexpr,
                            NEXT_ROW: gl.constexpr, S_LAYOUT: gl.constexpr,
                            O_LAYOUT: gl.constexpr, OUT_LAYOUT: gl.constexpr,
                            V_ZERO: gl.constexpr):
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        if PERSISTENT:
            t = num_items * 0
            done = num_items * 0
            if NEXT_ROW:
                _, n_row, n_pos, n_len, n_tiles, _, n_head = _persistent_item(
                    tiles_ptr, 0, num_items, num_heads, BLOCK_N)
            for k in range(gl.cdiv(num_items, gl.num_programs(0))):
                if NEXT_ROW:
                    # The next item's row is read before this item's work, so its load's
                    # round trip is not waited for between items. (Its unmasked tiles are
                    # counted again here: carried through the loop, Triton 3.6 loses them
                    # and every item reads the first one's.)
                    q_row = n_row
                    first_pos = n_pos
                    seq_len = n_len
                    num_tiles = n_tiles
                    head = n_head
                    num_full = _unmasked_tiles(first_pos, num_tiles, BLOCK_N)
                    _, n_row, n_pos, n_len, n_tiles, _, n_head = _persistent_item(
                        tiles_ptr, k + 1, num_items, num_heads, BLOCK_N)
                else:
                    req, q_row, first_pos, seq_len, num_tiles, num_full, head = \
                        _persistent_item(tiles_ptr, k, num_items, num_heads, BLOCK_N)
                if num_tiles > 0:
                    _consume(q_smem, k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full,
                             v_empty, turn, sinks.index(WG), out_ptr, stride_ot, stride_oh,
                             q_row, head, first_pos, seq_len, num_tiles, num_full, qk_scale,
                             t, done, WG, STAGES, OVERLAP, PERSISTENT, S_LAYOUT, O_LAYOUT,
                             OUT_LAYOUT, V_ZERO)
                t += num_tiles
                done += gl.where(num_tiles > 0, 1, 0)
        elif num_tiles > 0:
            _consume(q_smem, k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty,
                     turn, sinks.index(WG), out_ptr, stride_ot, stride_oh, q_row, head,
                     first_pos, seq_len, num_tiles, num_full, qk_scale, 0, 0, WG, STAGES,
                     OVERLAP, PERSISTENT, S_LAYOUT, O_LAYOUT, OUT_LAYOUT, V_ZERO)

    @gluon.jit
    def _consume(q_smem, k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty,
                 turn, sink, out_ptr, stride_ot, stride_oh, q_row, head, first_pos, seq_len,
                 num_tiles, num_full, qk_scale, t, done, WG: gl.constexpr,
                 STAGES: gl.constexpr, OVERLAP: gl.constexpr, PERSISTENT: gl.constexpr,
                 S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, OUT_LAYOUT: gl.constexpr,
                 V_ZERO: gl.constexpr):
        """One consumer warpgroup's rows of an item with at least one key tile (``t``: key
        tiles the program's earlier items put through the ring; ``done``: its earlier items
        with work, each of ``t + 1`` turns)."""
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        dtype: gl.constexpr = k_smem.dtype
        buf, phase_q = _query_buffer(done, q_smem)
        q = q_smem.index(2 * buf + WG)
        rows = gl.arange(0, _HALF_M, layout=gl.SliceLayout(1, S_LAYOUT))
        q_pos = first_pos + WG * _HALF_M + rows
        m_i = gl.full([_HALF_M], float("-inf"), gl.float32, gl.SliceLayout(1, S_LAYOUT))
        l_i = gl.zeros([_HALF_M], gl.float32, gl.SliceLayout(1, S_LAYOUT))
        acc = gl.zeros([_HALF_M, _D], gl.float32, O_LAYOUT)

        # Section 0: the first tile's scores alone.
        mbarrier.wait(q_bar.index(buf), phase_q)
        mbarrier.wait(k_full.index(t % STAGES), t // STAGES & 1)
        _my_turn(turn, WG, t + done)
        s = warpgroup_mma(q, k_smem.index(t % STAGES).permute((1, 0)),
                          gl.zeros([_HALF_M, BLOCK_N], gl.float32, S_LAYOUT), use_acc=False,
                          is_async=True)
        mbarrier.arrive(turn.index(1 - WG))
        s = warpgroup_mma_wait(0, deps=[s])
        mbarrier.arrive(k_empty.index(t % STAGES))

        if OVERLAP:
            # Tile 0's probabilities (the accumulator is still zero: nothing to rescale),
            # then per tile the next tile's scores and softmax under this one's values.
            if num_full > 0:
                p, alpha, m_i, l_i = _probabilities(s, m_i, l_i, q_pos, 0, qk_scale, False,
                                                    S_LAYOUT, O_LAYOUT)
            else:
                p, alpha, m_i, l_i = _probabilities(s, m_i, l_i, q_pos, 0, qk_scale, True,
                                                    S_LAYOUT, O_LAYOUT)
            for j in range(0, num_full - 1):
                p, acc, m_i, l_i = _scores_then_values(
                    p, acc, m_i, l_i, q, q_pos, qk_scale, k_smem, v_smem, k_full, k_empty,
                    v_full, v_empty, turn, sink, j, t, done, WG, STAGES, False, S_LAYOUT,
                    O_LAYOUT)
            for j in range(gl.maximum(num_full - 1, 0), num_tiles - 1):
                p, acc, m_i, l_i = _scores_then_values(
                    p, acc, m_i, l_i, q, q_pos, qk_scale, k_smem, v_smem, k_full, k_empty,
                    v_full, v_empty, turn, sink, j, t, done, WG, STAGES, True, S_LAYOUT,
                    O_LAYOUT)
            j = num_tiles - 1
            n0 = j * BLOCK_N
            p = _operand(p, dtype, O_LAYOUT)
        else:
            for j in range(0, num_full):
                p, acc, m_i, l_i = _softmax(s, acc, m_i, l_i, q_pos, j * BLOCK_N, qk_scale,
                                            dtype, False, S_LAYOUT, O_LAYOUT)
                acc, s = _values_then_scores(p, acc, q, k_smem, v_smem, k_full, k_empty,
                                             v_full, v_empty, turn, j, t, done, WG, STAGES,
                                             S_LAYOUT)
            for j in range(num_full, num_tiles - 1):
                p, acc, m_i, l_i = _softmax(s, acc, m_i, l_i, q_pos, j * BLOCK_N, qk_scale,
                                            dtype, True, S_LAYOUT, O_LAYOUT)
                acc, s = _values_then_scores(p, acc, q, k_smem, v_smem, k_full, k_empty,
                                             v_full, v_empty, turn, j, t, done, WG, STAGES,
                                             S_LAYOUT)
            # The last tile (it holds the diagonal, and maybe keys past the sequence).
            j = num_tiles - 1
            n0 = j * BLOCK_N
            p, acc, m_i, l_i = _softmax(s, acc, m_i, l_i, q_pos, n0, qk_scale, dtype, True,
                                        S_LAYOUT, O_LAYOUT)
        if PERSISTENT:
            # Every product that reads the query tile is retired: the load warp may bring
            # the next item's.
            mbarrier.arrive(q_empty.index(buf))
        g = t + j
        stage = g % STAGES
        mbarrier.wait(v_full.index(stage), g // STAGES & 1)
        if n0 + BLOCK_N > seq_len:
            _zero_tail_values(v_smem.index(stage), n0, seq_len, V_ZERO)
        _my_turn(turn, WG, g + done + 1)
        acc = warpgroup_mma(p, v_smem.index(stage), acc, is_async=True)
        mbarrier.arrive(turn.index(1 - WG))
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index(stage))

        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, O_LAYOUT))
        o = gl.convert_layout((acc / l_o[:, None]).to(out_ptr.dtype.element_ty), OUT_LAYOUT)
        m = WG * _HALF_M + gl.arange(0, _HALF_M, layout=gl.SliceLayout(1, OUT_LAYOUT))
        d = gl.arange(0, _D, layout=gl.SliceLayout(0, OUT_LAYOUT))
        out_rows = (q_row + m).to(gl.int64) * stride_ot + head * stride_oh
        # A row is one of the request's queries while its position is in the sequence.
        gl.store(out_ptr + out_rows[:, None] + d[None, :], o,
                 mask=(first_pos + m < seq_len)[:, None])

    # (num_items varies with the batch: not specialized, so no batch compiles a variant.)
    @gluon.jit(do_not_specialize=["num_items"])
    def _gluon_prefill_attention_kernel(
            desc_q, desc_k, desc_v, bt_ptr, tiles_ptr, out_ptr, stride_bt,
            stride_ot, stride_oh, qk_scale, num_items, num_heads,
            GROUP: gl.constexpr, BLOCK_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
            STAGES: gl.constexpr, OVERLAP: gl.constexpr, PERSISTENT: gl.constexpr,
            QUERY_BUFFERS: gl.constexpr, NEXT_ROW: gl.constexpr, CONSUMER_REGS: gl.constexpr,
            LOAD_REGS: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr,
            OUT_LAYOUT: gl.constexpr, SMEM: gl.constexpr, TABLE: gl.constexpr,
            V_ZERO: gl.constexpr, SINK: gl.constexpr):
        if PERSISTENT:
            # Each partition walks the program's items itself (_persistent_item).
            head = 0
            req = 0
            q_row = 0
            first_pos = 0
            seq_len = 0
            num_tiles = 0
            num_full = 0
        else:
            # One item: this head of the slot's query tile (an empty slot: no tiles, every
            # partition skips its part, and the warp-specialized region stays
            # unconditional).
            head = gl.program_id(0)
            req, q_row, first_pos, seq_len, num_tiles, num_full = _tile_row(
                tiles_ptr, gl.program_id(1), BLOCK_N)
        dtype: gl.constexpr = desc_k.dtype

        # QUERY_BUFFERS query tiles, each two halves of 64 rows (a consumer's each).
        q_smem = gl.allocate_shared_memory(dtype, [2 * QUERY_BUFFERS, _HALF_M, _D], SMEM)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, _D], SMEM)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, _D], SMEM)
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        q_bar = gl.allocate_shared_memory(gl.int64, [QUERY_BUFFERS, 1], bar_layout)
        # (Persistent: the consumers' release of the query tile for the next item's.)
        q_empty = gl.allocate_shared_memory(gl.int64, [QUERY_BUFFERS, 1], bar_layout)
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        # Each consumer's row sums, stored and never read (see _scores_then_values).
        sinks = gl.allocate_shared_memory(gl.float32, [2, _HALF_M], SINK)
        for i in gl.static_range(QUERY_BUFFERS):
            mbarrier.init(q_bar.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_full.index(i), count=1)
            mbarrier.init(v_full.index(i), count=1)
            # One arrival per consumer warpgroup.
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        fence_async_shared()

        gl.warp_specialize([
            (_consumer_partition, (
                q_smem, k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty, turn,
                sinks, out_ptr, stride_ot, stride_oh, tiles_ptr, q_row, head, first_pos,
                seq_len, num_tiles, num_full, num_items, num_heads, qk_scale, 0, STAGES,
                OVERLAP, PERSISTENT, NEXT_ROW, S_LAYOUT, O_LAYOUT, OUT_LAYOUT, V_ZERO)),
            (_consumer_partition, (
                q_smem, k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty, turn,
                sinks, out_ptr, stride_ot, stride_oh, tiles_ptr, q_row, head, first_pos,
                seq_len, num_tiles, num_full, num_items, num_heads, qk_scale, 1, STAGES,
                OVERLAP, PERSISTENT, NEXT_ROW, S_LAYOUT, O_LAYOUT, OUT_LAYOUT, V_ZERO)),
            (_load_partition, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, q_empty,
                               k_full, k_empty, v_full, v_empty, bt_ptr, stride_bt, tiles_ptr,
                               req, q_row, head, seq_len, num_tiles, num_items, num_heads,
                               GROUP, BLOCK_SIZE, BLOCK_N, STAGES, PERSISTENT, SMEM, TABLE)),
        ], [4, 1], [CONSUMER_REGS, LOAD_REGS])


def serves(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
           sliding_window: int | None = None, logit_softcap: float | None = None,
           attention_stride: int | None = None) -> bool:
    """Whether ``gluon_prefill_attention`` can take this batch: Gluon's Hopper API present, a
    Hopper GPU (compute capability 9.x: ``wgmma`` and ``setmaxnreg`` are not on later
    architectures), head dim 128, a contiguous 16-bit cache in the query's dtype with
    blocks of a power of two from 16 tokens, queries whose heads are packed in 16-byte
    aligned rows, no window, cap or strided pattern."""
    if TensorDescriptor is None or not runs_on(query.device, hopper_only=True):
        return False
    block_size = key_cache.shape[1]
    return (sliding_window is None and logit_softcap is None and attention_stride is None
            and query.dtype in (torch.float16, torch.bfloat16)
            and key_cache.dtype == query.dtype and value_cache.dtype == query.dtype
            and query.shape[2] == HEAD_DIM and key_cache.shape[3] == HEAD_DIM
            and query.shape[1] % key_cache.shape[2] == 0
            and block_size >= 16 and block_size & (block_size - 1) == 0
            and key_cache.is_contiguous() and value_cache.is_contiguous()
            and key_cache.data_ptr() % 16 == 0 and value_cache.data_ptr() % 16 == 0
            and query.stride(2) == 1 and query.stride(1) == HEAD_DIM
            and query.stride(0) % 8 == 0 and query.data_ptr() % 16 == 0)


def gluon_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            scale: float, max_query_len: int | None = None,
                            out: torch.Tensor | None = None,
                            tiles: torch.Tensor | None = None, *, block_n: int = BLOCK_N,
                            stages: int = STAGES, overlap: bool = OVERLAP,
                            persistent: bool = PERSISTENT,
                            query_buffers: int = QUERY_BUFFERS, next_row: bool = NEXT_ROW,
                            whole_sectors: bool = WHOLE_SECTORS,
                            consumer_regs: int = CONSUMER_REGS, load_regs: int = LOAD_REGS,
                            max_regs: int = MAX_REGS, check: bool = True) -> torch.Tensor:
    """Causal prefill/extend attention as ``prefill_attention`` (arguments alike; the batch
    must pass ``serves``).

    Args:
        query: ``[T, H, 128]`` packed queries, bfloat16 or float16.
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, 128]`` in query's dtype,
            with this step's KV already written.
        block_tables: ``[B, max_blocks]`` int32/int64.
        seq_lens: ``[B]`` cached + new tokens per request.
        query_start_loc: ``[B + 1]`` row offsets of each request's queries.
        scale: softmax scale.
        max_query_len: longest query chunk; pass it to avoid a device sync.
        out: ``[T, H, 128]`` to write into (allocated if None).
        tiles: ``prefill_args.query_tiles`` of this batch at 128 queries a tile (built
            here if None), with ``longest_first`` as ``persistent``.
        block_n, stages: keys per tile (64 or 128) and ring buffers (2+), for sweeps.
        overlap: run the next tile's softmax under this tile's P @ V (see ``OVERLAP``).
        persistent: a program per SM walking the items (see ``PERSISTENT``).
        query_buffers: the persistent launch's query tiles in shared memory, 1 or 2 (see
            ``QUERY_BUFFERS``; a program per item takes 1).
        next_row: the persistent launch's consumers read the next item's row early (see
            ``NEXT_ROW``).
        whole_sectors: store the output in whole 32-byte sectors (see ``WHOLE_SECTORS``).
        consumer_regs, load_regs, max_regs: registers per thread of the second consumer
            warpgroup and the load warp, and the kernel's limit (the first consumer gets
            the rest), for sweeps.
        check: validate the arguments; ``False`` only for a caller that has
            (``prefill_attention``, whose host time per layer counts in eager steps).
    Returns:
        ``out`` (rows outside every request's range are left unwritten).
    """
    if check:
        check_prefill_args(query, key_cache, value_cache, block_tables, seq_lens,
                           query_start_loc)
    if block_n not in (64, 128):
        raise ValueError(f"block_n must be 64 or 128, got {block_n}.")
    if query_buffers not in (1, 2):
        raise ValueError(f"query_buffers must be 1 or 2, got {query_buffers}.")
    query_buffers = query_buffers if persistent else 1
    tiles_bytes = ((2 * query_buffers * HALF_M + 2 * stages * block_n) * HEAD_DIM
                   * query.element_size())
    if tiles_bytes > _MAX_SMEM:
        raise ValueError(f"stages={stages} and query_buffers={query_buffers} need "
                         f"{tiles_bytes} bytes of shared memory at block_n={block_n}, more "
                         f"than a block's {_MAX_SMEM}.")
    if out is None:
        out = torch.empty_like(query)
    max_query_len = longest_query(query, query_start_loc, max_query_len)
    if max_query_len == 0:
        return out
    num_tokens, num_heads = query.shape[:2]
    if tiles is None:
        tiles = query_tiles(query_start_loc, seq_lens, num_tokens, max_query_len, BLOCK_M,
                            longest_first=persistent)
    elif check and (tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 4
                    or not tiles.is_contiguous() or tiles.device != query.device):
        raise ValueError("tiles must be query_tiles' contiguous [slots, 4] int32 tensor on "
                         f"the query's device, got {tuple(tiles.shape)} {tiles.dtype} on "
                         f"{tiles.device}.")
    num_blocks, block_size, num_kv_heads = key_cache.shape[:3]
    layouts = _layouts(block_n, bool(whole_sectors))
    smem = layouts["SMEM"]
    piece = min(block_size, block_n)
    rows = num_blocks * block_size, num_kv_heads * HEAD_DIM
    desc_k, desc_v = (TensorDescriptor(c.view(rows), list(rows), [rows[1], 1],
                                       [piece, HEAD_DIM // 2], smem)
                      for c in (key_cache, value_cache))
    desc_q = TensorDescriptor(query, [num_tokens, num_heads * HEAD_DIM], [query.stride(0), 1],
                              [HALF_M, HEAD_DIM], smem)
    num_items = num_heads * tiles.shape[0]
    grid = (min(num_items, num_sms(query.device)),) if persistent \
        else (num_heads, tiles.shape[0])
    _gluon_prefill_attention_kernel[grid](
        desc_q, desc_k, desc_v, block_tables, tiles, out,
        block_tables.stride(0), out.stride(0), out.stride(1), float(scale) * _LOG2E,
        num_items, num_heads, GROUP=num_heads // num_kv_heads, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, STAGES=stages, OVERLAP=bool(overlap),
        PERSISTENT=bool(persistent), QUERY_BUFFERS=query_buffers, NEXT_ROW=bool(next_row),
        CONSUMER_REGS=consumer_regs,
        LOAD_REGS=load_regs, **layouts, num_warps=4, maxnreg=max_regs)
    return out
