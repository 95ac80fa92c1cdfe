"""Decode attention over an FP8 (e4m3) paged cache whose tiles reach the tensor cores
without a float16 round trip through shared memory (Gluon, CUDA 9.0+).

The ``tl.dot`` kernel (``kernels.paged_decode_attention``) converts each e4m3 key and value
tile to float16 in registers, then has the compiler store it to shared memory and read it
back in the MMA's operand layout (``ldmatrix``): six bytes of shared-memory traffic per byte
read from DRAM, at 4.6-8.5-way bank conflicts (Nsight Compute, H200), where a bf16 cache
needs two. This kernel is written in Gluon, Triton's dialect with explicit layouts, so the
register layouts are chosen by hand:

- K and V tiles of ``BLOCK_N`` keys are copied by ``cp.async`` into a ring of ``STAGES``
  shared-memory buffers (16-byte chunks XOR-swizzled by row, so a quarter-warp's vectors
  fall in distinct banks) and read back as 16-byte vectors, each thread holding whole runs
  of one key's row.
- The MMA (``mma.sync`` m16n8k16, float16 in, float32 sums) takes its operands straight
  from those registers. Its operand layouts want, per thread, pairs of consecutive indices
  of the reduction dim, which for ``P @ V`` (a reduction over keys) are bytes of different
  rows; but a reduction may run in any order, and an output column may be stored anywhere.
  So each tile is *relabelled*: for ``Q K^T`` the head dim's index bits are permuted (the
  query's too, once), for ``P @ V`` the output's dims (undone before the store), such that
  the vector a thread loaded is exactly the operand fragment it needs. The relabelling is
  a reshape and a permute, and ``convert_layout(..., assert_trivial=True)`` checks at
  compile time that it moves no data between threads.
- ``S = Q K^T``'s accumulator layout is ``P``'s operand layout for ``P @ V`` (the usual
  register reuse), so the probabilities never leave registers either.

One program (one warp) handles one (request, KV head), or one split of its keys: the GQA
group's query heads are the MMA's 16 rows (a group of up to 16). The cache is read as
``k * k_scale``, ``v * v_scale`` (``k_scale`` folded into ``scale_log2``). What it does not
do (the ``tl.dot`` kernel keeps those cases): sliding windows, soft-capping, the strided
pattern, a head dim other than 128.
"""

from __future__ import annotations

import functools

import torch

from kernels._gluon import async_copy as _async
from kernels._gluon import gl, gluon, mma_layouts, mma_v2, runs_layout, runs_on
from kernels._utils import env_switch
from kernels.fp8 import FP8_DTYPE

HEAD_DIM = 128
MAX_GROUP = 16
# Pipeline stages of the default launch (one tile copied while the other is read).
STAGES = 2
# Programs per SM past which, up to _SMALL_TILE_MAX, 16-key tiles replace 32-key ones.
_SMALL_TILE_MIN = 8
_SMALL_TILE_MAX = 12
# GRIDLLM_GLUON_DECODE=0 before start keeps the tl.dot kernel everywhere.
ENABLED = env_switch("GRIDLLM_GLUON_DECODE")


@functools.cache
def _layouts(block_n: int) -> dict:
    """The kernel's register and shared-memory layouts for tiles of ``block_n`` keys."""
    key_bits = [[1 << b, 0] for b in range(3, block_n.bit_length() - 1)]
    return dict(
        **mma_layouts(),
        # [keys, dims]: runs of 32 dims a thread (Q K^T's B operand after relabel_k), and
        # the query's 16 rows the same way (its A operand).
        K_LOAD=runs_layout(block_n),
        Q_LOAD=runs_layout(16),
        # [keys, dims]: thread (g, t) holds keys 2t + {0, 1} + 8j (j = 0, 1, ...) with
        # bits 1-2 from t, dims 16g..16g+15 (one vector a key): after _v_relabel, P @ V's
        # B operand.
        V_LOAD=gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [1, 0]] + key_bits,
            lane_bases=[[2, 0], [4, 0], [0, 16], [0, 32], [0, 64]],
            warp_bases=[], block_bases=[], shape=[block_n, HEAD_DIM]),
        OUT=gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                             warps_per_cta=[1, 1], order=[1, 0]),
        SMEM=gl.SwizzledSharedLayout(16, 1, 8, [1, 0]),
    )


if gluon is not None:
    from kernels._gluon import async_load as _async_load
    from kernels._gluon import barrier as _barrier
    from kernels._gluon import gdc_launch_dependents, gdc_wait
    from kernels._gluon import relabel_k as _k_relabel

    _D = gl.constexpr(HEAD_DIM)

    @gluon.jit
    def _v_relabel(x):
        """``[R, 128]`` with dim ``d = e + 16f`` (e < 16, f < 8) as index ``f + 8e``: V_LOAD's
        dims become P @ V's output columns (``_v_unlabel`` undoes it)."""
        R: gl.constexpr = x.shape[0]
        return gl.reshape(gl.permute(gl.reshape(x, [R, 8, 16]), [0, 2, 1]), [R, 128])

    @gluon.jit
    def _v_unlabel(x):
        R: gl.constexpr = x.shape[0]
        return gl.reshape(gl.permute(gl.reshape(x, [R, 16, 8]), [0, 2, 1]), [R, 128])

    @gluon.jit
    def _issue_tile(k_smem, v_smem, stage, k_ptrs, v_ptrs, rows_k, rows_v, keys_k, keys_v,
                    n, end):
        """cp.async of the K and V tile starting at key ``n`` (rows from ``end`` on zero)."""
        _async_load(k_smem.index(stage), k_ptrs + rows_k[:, None],
                    mask=(n + keys_k < end)[:, None])
        _async_load(v_smem.index(stage), v_ptrs + rows_v[:, None],
                    mask=(n + keys_v < end)[:, None])
        _async.commit_group()

    @gluon.jit
    def _row_offsets(bt_row, n, keys, end, stride_cb, stride_ct, BLOCK_SIZE: gl.constexpr):
        """Cache offsets of keys ``n + keys`` (block number times the block stride plus the
        slot's); keys from ``end`` on read no block number."""
        pos = n + keys
        block = gl.load(bt_row + pos // BLOCK_SIZE, mask=pos < end, other=0)
        return block.to(gl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_ct

    @gluon.jit
    def _issue_prologue(k_smem, v_smem, k_ptrs, v_ptrs, bt_row, start, end, keys_k, keys_v,
                        stride_cb, stride_ct, BLOCK_SIZE: gl.constexpr,
                        BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """cp.async of the split's tiles 0 .. STAGES - 2 into stages 0 .. STAGES - 2."""
        for i in gl.static_range(STAGES - 1):
            n = start + i * BLOCK_N
            _issue_tile(k_smem, v_smem, i, k_ptrs, v_ptrs,
                        _row_offsets(bt_row, n, keys_k, end, stride_cb, stride_ct,
                                     BLOCK_SIZE),
                        _row_offsets(bt_row, n, keys_v, end, stride_cb, stride_ct,
                                     BLOCK_SIZE),
                        keys_k, keys_v, n, end)

    @gluon.jit
    def _fp8_decode_attention_kernel(
            q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
            stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
            stride_ot, stride_oh, num_heads, scale_log2, v_scale,
            GROUP: gl.constexpr, BLOCK_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
            STAGES: gl.constexpr, NUM_SPLITS: gl.constexpr, USE_GDC: gl.constexpr,
            EARLY: gl.constexpr, MMA: gl.constexpr, A_OP: gl.constexpr, B_OP: gl.constexpr,
            K_LOAD: gl.constexpr, Q_LOAD: gl.constexpr, V_LOAD: gl.constexpr,
            OUT: gl.constexpr, SMEM: gl.constexpr):
        req = gl.program_id(0)
        kvh = gl.program_id(1)
        if USE_GDC:
            gdc_launch_dependents()
            if not EARLY:
                gdc_wait()
        seq_len = gl.load(seq_lens_ptr + req)
        # This split's keys [start, end) (all of them with one split).
        split = gl.program_id(2)
        per_split = gl.cdiv(gl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = gl.minimum(start + per_split, seq_len)
        head0 = kvh * GROUP

        k_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, _D], SMEM)
        v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, _D], SMEM)
        keys_k = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, K_LOAD))
        keys_v = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, V_LOAD))
        dims_k = gl.arange(0, _D, layout=gl.SliceLayout(0, K_LOAD))
        dims_v = gl.arange(0, _D, layout=gl.SliceLayout(0, V_LOAD))
        head_off = kvh.to(gl.int64) * stride_ch
        k_ptrs = kc_ptr + head_off + dims_k[None, :]
        v_ptrs = vc_ptr + head_off + dims_v[None, :]
        bt_row = bt_ptr + req.to(gl.int64) * stride_bt

        # Tiles 0 .. STAGES - 2 in flight. With EARLY (launched early, not yet waited) the
        # sequence length and block table above are the step's inputs, and the tiles are
        # requested before the wait unless they hold the newest key, which the kernel
        # before (the KV write) stores. (Without EARLY the prologue is one static branch:
        # a `False` assigned to a name is a runtime i1 in Triton 3.6, and the cp.async
        # prologue under an `if` of that constant failed its sm_90 lowering.)
        if EARLY:
            newest = seq_len - 1
            early = (end < seq_len) | (newest < start) \
                | (start + (STAGES - 1) * BLOCK_N <= newest)
            if early:
                _issue_prologue(k_smem, v_smem, k_ptrs, v_ptrs, bt_row, start, end, keys_k,
                                keys_v, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N, STAGES)
            if USE_GDC:
                gdc_wait()
            if not early:
                _issue_prologue(k_smem, v_smem, k_ptrs, v_ptrs, bt_row, start, end, keys_k,
                                keys_v, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N, STAGES)
        else:
            _issue_prologue(k_smem, v_smem, k_ptrs, v_ptrs, bt_row, start, end, keys_k,
                            keys_v, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N, STAGES)
        n = start + (STAGES - 1) * BLOCK_N
        rows_k = _row_offsets(bt_row, n, keys_k, end, stride_cb, stride_ct, BLOCK_SIZE)
        rows_v = _row_offsets(bt_row, n, keys_v, end, stride_cb, stride_ct, BLOCK_SIZE)
        # The GROUP query heads as the MMA's rows (the rest zeros), float16, relabelled
        # (after the wait: the kernel before rotates q).
        rows = gl.arange(0, 16, layout=gl.SliceLayout(1, Q_LOAD))
        qd = gl.arange(0, _D, layout=gl.SliceLayout(0, Q_LOAD))
        q = gl.load(q_ptr + req.to(gl.int64) * stride_qt
                    + (head0 + rows)[:, None] * stride_qh + qd[None, :],
                    mask=(rows < GROUP)[:, None], other=0.0).to(gl.float16)
        q = gl.convert_layout(_k_relabel(q), A_OP, assert_trivial=True)

        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, MMA))
        m_i = gl.full([16], float("-inf"), gl.float32, layout=gl.SliceLayout(1, MMA))
        l_i = gl.full([16], 0.0, gl.float32, layout=gl.SliceLayout(1, MMA))
        acc = gl.full([16, _D], 0.0, gl.float32, layout=MMA)
        for t in range(gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)):
            # Every lane is past its reads of the stage refilled here (read last iteration).
            _barrier()
            n = start + (t + STAGES - 1) * BLOCK_N
            _issue_tile(k_smem, v_smem, (t + STAGES - 1) % STAGES, k_ptrs, v_ptrs,
                        rows_k, rows_v, keys_k, keys_v, n, end)
            rows_k = _row_offsets(bt_row, n + BLOCK_N, keys_k, end, stride_cb,
                                  stride_ct, BLOCK_SIZE)
            rows_v = _row_offsets(bt_row, n + BLOCK_N, keys_v, end, stride_cb,
                                  stride_ct, BLOCK_SIZE)
            _async.wait_group(STAGES - 1)
            _barrier()  # other lanes' copies of this tile are visible
            stage = t % STAGES
            k = k_smem.index(stage).load(K_LOAD).to(gl.float16)
            k = gl.convert_layout(gl.permute(_k_relabel(k), [1, 0]), B_OP, assert_trivial=True)
            s = mma_v2(q, k, gl.full([16, BLOCK_N], 0.0, gl.float32, layout=MMA))
            s = gl.where((start + t * BLOCK_N + cols < end)[None, :], s * scale_log2,
                         float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            p = gl.convert_layout(p.to(gl.float16), A_OP, assert_trivial=True)
            v = v_smem.index(stage).load(V_LOAD).to(gl.float16)
            v = gl.convert_layout(_v_relabel(v), B_OP, assert_trivial=True)
            acc = mma_v2(p, v, acc * alpha[:, None])
        _async.wait_group(0)
        orow = gl.arange(0, 16, layout=gl.SliceLayout(1, OUT))
        od = gl.arange(0, _D, layout=gl.SliceLayout(0, OUT))
        if NUM_SPLITS == 1:
            # A padding row (seq_len 0) has l = 0 and a zero accumulator: zeros out.
            o = acc * (v_scale / gl.where(l_i > 0, l_i, 1.0))[:, None]
            o = gl.convert_layout(_v_unlabel(o).to(out_ptr.dtype.element_ty), OUT)
            gl.store(out_ptr + req.to(gl.int64) * stride_ot
                     + (head0 + orow)[:, None] * stride_oh + od[None, :], o,
                     mask=(orow < GROUP)[:, None])
        else:
            # The split's unnormalised sums, row maximum and sum of exponentials, as the
            # tl.dot kernel leaves them for its merge kernel.
            o = gl.convert_layout(_v_unlabel(acc * v_scale), OUT)
            part = (req.to(gl.int64) * num_heads + head0 + orow) * NUM_SPLITS + split
            gl.store(part_acc_ptr + part[:, None] * _D + od[None, :], o,
                     mask=(orow < GROUP)[:, None])
            mrow = gl.arange(0, 16, layout=gl.SliceLayout(1, MMA))
            part = (req.to(gl.int64) * num_heads + head0 + mrow) * NUM_SPLITS + split
            gl.store(part_ml_ptr + part * 2, m_i, mask=mrow < GROUP)
            gl.store(part_ml_ptr + part * 2 + 1, l_i, mask=mrow < GROUP)


def default_launch(programs: int, num_splits: int, sms: int) -> tuple[int, int]:
    """``(keys per iteration, pipeline stages)`` for ``programs`` (requests x KV heads) split
    ``num_splits`` ways on ``sms`` SMs. One split: 32-key tiles (191 registers a thread, 10
    programs per SM) and 2 stages, except at 8-12 programs per SM, where 16-key tiles (162
    registers, 12 per SM) fit one wave, and up to one program per SM. H200, Llama-3-8B
    heads, us, 32 / 16 keys: batch 256 x 616 / 1024 / 2048 88.9 / 100.7, 136.7 / 159.0,
    259.2 / 306.6; 224 x 616 82.7 / 98.9; 176 x 616 79.2 / 61.0; 160 x 1024 122.1 / 93.6;
    128 x 616 46.3 / 46.4, x 4096 255.0 / 265.2; 64 x 616 32.2 / 34.4, x 4096 162.8 /
    186.3; batch 1 x 40 8.7 / 7.8. Three to six stages were no faster. Split-KV: 16 keys
    (batch 1 x 4096 keys in 128 splits 11.9 against 13.2 us, 8 x 1024 in 16 13.8 / 14.7;
    up to 1.6% slower at 512-1024 keys a split)."""
    if num_splits > 1 or programs <= sms or (
            _SMALL_TILE_MIN * sms < programs <= _SMALL_TILE_MAX * sms):
        return 16, STAGES
    return 32, STAGES


def serves_layout(cache_dtype: torch.dtype, query_dtype: torch.dtype, head_dim: int,
                  group: int, device: torch.device) -> bool:
    """Whether the kernel can take a model's decode attention: an e4m3 cache under a 16-bit
    query on a CUDA GPU of compute capability 9.0+ (measured on an H200), head dim 128, a
    GQA group of up to 16 (``ENABLED``, Gluon available)."""
    return (ENABLED and cache_dtype == FP8_DTYPE
            and query_dtype in (torch.bfloat16, torch.float16) and head_dim == HEAD_DIM
            and 1 <= group <= MAX_GROUP and runs_on(device))


def serves(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
           sliding_window: int | None, logit_softcap: float | None,
           attention_stride: int | None) -> bool:
    """Whether the kernel takes this decode batch: ``serves_layout``, no window, cap or
    strided pattern, 16-byte aligned rows."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    return (sliding_window is None and logit_softcap is None and attention_stride is None
            and num_heads % num_kv_heads == 0
            and serves_layout(key_cache.dtype, query.dtype, head_dim,
                              num_heads // num_kv_heads, query.device)
            and key_cache.stride(3) == 1 and query.stride(2) == 1
            and all(s % 16 == 0 for s in key_cache.stride()[:3])
            and key_cache.data_ptr() % 16 == 0 and value_cache.data_ptr() % 16 == 0)


def fp8_decode_attention(query: torch.Tensor, key_cache: torch.Tensor,
                         value_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, out: torch.Tensor, scale_log2: float,
                         v_scale: float, block_n: int, stages: int,
                         use_gdc: bool = False, num_splits: int = 1,
                         part_acc: torch.Tensor | None = None,
                         part_ml: torch.Tensor | None = None,
                         early_reads: bool = False) -> torch.Tensor:
    """Fills ``out [B, H, 128]`` with decode attention over the e4m3 paged cache (arguments
    as ``paged_decode_attention``'s, checked there and by ``serves``; ``scale_log2`` the
    softmax scale times ``k_scale`` times log2(e)); ``block_n`` keys per iteration (a power
    of two from 16), ``stages`` (2+) as ``default_launch`` gives them. With ``num_splits``
    > 1 each (request, KV head) is split over that many programs, which write their partial
    results to ``part_acc [B * H * num_splits, 128]`` and ``part_ml [B * H * num_splits, 2]``
    (float32) for ``paged_decode_attention``'s merge kernel instead of ``out``.
    ``early_reads``: with ``use_gdc``, the sequence lengths, block table and first key
    tiles are read before the kernel waits for the one before it (every key but each
    request's newest must be in the cache already: one new token a request, written by
    an earlier kernel)."""
    num_reqs, num_heads = query.shape[:2]
    num_kv_heads = key_cache.shape[2]
    if num_splits == 1:
        part_acc = part_ml = out
    _fp8_decode_attention_kernel[(num_reqs, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens, out, part_acc, part_ml,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1), num_heads,
        scale_log2, v_scale, GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=key_cache.shape[1], BLOCK_N=block_n, STAGES=stages,
        NUM_SPLITS=num_splits, USE_GDC=use_gdc, EARLY=early_reads,
        **_layouts(block_n), num_warps=1, **({"launch_pdl": True} if use_gdc else {}))
    return out
