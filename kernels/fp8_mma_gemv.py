"""``y = x @ (W * scale[:, None])^T + b`` for a few bfloat16 rows (decode) and an e4m3
weight, on the tensor cores (Gluon, CUDA 9.0+).

The word GEMV (``kernels.gemv``) converts each e4m3 weight element and multiplies it on the
CUDA cores: a conversion and an FMA per byte read, which held it at ~77% of copy bandwidth
on an H200. Here the weight tile is the A operand of ``mma.sync`` (m16n8k16, bfloat16 in,
float32 sums) and the up-to-8 rows of x its B operand, so the FMAs move to the tensor cores:

- Tiles of ``BLOCK_N`` output channels x 128 of K are copied by ``cp.async`` into a ring of
  shared-memory buffers, x's 8 x 128 tile with them, and read back as 16-byte vectors.
- e4m3 becomes bfloat16 exactly by integer ops, two elements per three instructions
  (``prmt`` with sign replication, a shift, a mask): the sign lands in bit 15 and the
  exponent and mantissa bits under bfloat16's, which reads as ``w * 2^-120``. x is scaled by
  2^64 (exact) so the products stay far from float32's denormals; the 2^56 left over is
  folded into the channel scale. (e4m3 subnormals become bfloat16 subnormals.)
- As in ``kernels.fp8_decode_attention`` the reduction dim's index bits are permuted (in W
  and x alike) so each thread's loaded vector is its operand fragment, which
  ``convert_layout(..., assert_trivial=True)`` checks at compile time.

One warp a program: ``BLOCK_N`` channels (16 per MMA row tile), one of ``SPLIT_K`` ranges of
K; split programs leave float32 partial sums and the last one of a tile (an atomic count)
adds them up. ``SILU_OUT`` (the merged gate/up projection): the program's first half of rows
are gate channels, the second half the matching up channels, and it writes
``silu(gate) * up`` rounded as ``kernels/silu_and_mul.py`` does.

Where it serves (H200, Llama-3-8B, a CUDA graph of 32 launches over 32 weights, us per
layer, q/k/v + o + gate/up + down): at 2 / 4 / 8 rows 81.7 / 84.4 / 96.1 against 107.9 /
107.8 / 107.8 for the e4m3 ``tl.dot`` kernel (``kernels.fp8_gemv``); at one row 76.5
against 64.5 for the word GEMV, which keeps that row. With programmatic dependent launch
the kernel lets the next one launch only after its loop: signalled at its start, the
batch-4 decode ran at 805 out tok/s against 1,130 (random:llama3-8b, FP8 weights and cache).
The weight's first tiles, which no kernel writes, are requested before the wait for the
previous kernel, x's after it: batch 4 1,135 -> 1,160, batch 8 2,035 -> 2,103 out tok/s.
"""

from __future__ import annotations

import functools

import torch
import triton

from kernels._gluon import RUN_K, gl, gluon, mma_layouts, mma_v2, runs_layout, runs_on
from kernels._gluon import async_copy as _async
from kernels._utils import (
    check_shape,
    check_tensor,
    env_switch,
    launch_dependent_args,
    num_sms,
    split_k_workspace,
)
from kernels.fp8 import FP8_DTYPE
from kernels.silu_and_mul import silu_mul

MAX_ROWS = 8
BLOCK_K = RUN_K
# (channels a program, pipeline stages, programs per SM the split count aims at): the best
# or within 0.4 us of the best of 18 per Llama-3-8B layer at one row on an H200.
DEFAULT_CONFIG = (64, 3, 2)
# GRIDLLM_MMA_GEMV=0 before start keeps the tl.dot kernel for 2-8 rows.
ENABLED = env_switch("GRIDLLM_MMA_GEMV")


@functools.cache
def _layouts(block_n: int) -> dict:
    return dict(
        **mma_layouts(),
        # [channels, K] and [8 rows of x, K]: runs of 32 of K a thread (after relabel_k
        # the A and B operands).
        W_LOAD=runs_layout(block_n),
        X_LOAD=runs_layout(MAX_ROWS),
        W_SMEM=gl.SwizzledSharedLayout(16, 1, 8, [1, 0]),
        X_SMEM=gl.SwizzledSharedLayout(8, 1, 8, [1, 0]),
    )


if gluon is not None:
    from kernels._gluon import async_load as _async_load
    from kernels._gluon import barrier as _barrier
    from kernels._gluon import gdc_launch_dependents, gdc_wait
    from kernels._gluon import relabel_k as _relabel_k

    _BK = gl.constexpr(BLOCK_K)
    _ROWS = gl.constexpr(MAX_ROWS)

    @gluon.jit
    def _e4m3_to_bf16(w):
        """e4m3 bytes as bfloat16 ``w * 2^-120`` (exact): per byte pair one ``prmt`` placing
        each byte, sign-extended, in a 16-bit half, then ``(h << 4) & 0x87F0``."""
        return gl.inline_asm_elementwise(
            """{
            .reg .b32 t0, t1;
            prmt.b32 t0, $2, 0, 0x9180;
            prmt.b32 t1, $2, 0, 0xB3A2;
            shl.b32 t0, t0, 4;
            shl.b32 t1, t1, 4;
            and.b32 $0, t0, 0x87F087F0;
            and.b32 $1, t1, 0x87F087F0;
            }""", "=r,=r,r", [w], dtype=gl.bfloat16, is_pure=True, pack=4)

    @gluon.jit
    def _issue_w(w_smem, stage, w_ptrs, kw, off, num_k):
        """cp.async of the W tile at K offset ``off`` (zeros from ``num_k`` on)."""
        _async_load(w_smem.index(stage), w_ptrs + (off + kw), mask=(off + kw < num_k))

    @gluon.jit
    def _issue_x(x_smem, stage, x_ptrs, x_rows_ok, kx, off, num_k):
        """cp.async of x's tile at K offset ``off`` (zeros from ``num_k`` on)."""
        _async_load(x_smem.index(stage), x_ptrs + (off + kx),
                    mask=x_rows_ok & (off + kx < num_k))

    @gluon.jit
    def _fp8_mma_gemv_kernel(
            x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, partial_ptr, lock_ptr,
            num_rows, num_out, num_in, stride_x, stride_w, stride_y, k_per_split,
            HAS_BIAS: gl.constexpr, SILU_OUT: gl.constexpr, SPLIT_K: gl.constexpr,
            BLOCK_N: gl.constexpr, STAGES: gl.constexpr, USE_GDC: gl.constexpr,
            MMA: gl.constexpr, A_OP: gl.constexpr, B_OP: gl.constexpr,
            W_LOAD: gl.constexpr, X_LOAD: gl.constexpr, W_SMEM: gl.constexpr,
            X_SMEM: gl.constexpr):
        tile = gl.program_id(0)
        pid_k = gl.program_id(1)
        # Weight rows of the tile: BLOCK_N channels, or with SILU_OUT BLOCK_N / 2 gate
        # channels then their up channels (num_out // 2 further).
        r = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, W_LOAD))
        if SILU_OUT:
            HALF: gl.constexpr = BLOCK_N // 2
            w_rows = gl.where(r < HALF, tile * HALF + r, num_out // 2 + tile * HALF + r - HALF)
            w_ok = tile * HALF + (r % HALF) < num_out // 2
        else:
            w_rows = tile * BLOCK_N + r
            w_ok = w_rows < num_out
        w_rows = gl.where(w_ok, w_rows, 0)
        kw = gl.arange(0, _BK, layout=gl.SliceLayout(0, W_LOAD))
        k_start = pid_k * k_per_split
        k_end = gl.minimum(k_start + k_per_split, num_in)
        w_ptrs = w_ptr + (w_rows.to(gl.int64) * stride_w + k_start)[:, None]
        xr = gl.arange(0, _ROWS, layout=gl.SliceLayout(1, X_LOAD))
        kx = gl.arange(0, _BK, layout=gl.SliceLayout(0, X_LOAD))
        x_rows_ok = (xr < num_rows)[:, None]
        x_ptrs = x_ptr + (gl.where(xr < num_rows, xr, 0).to(gl.int64) * stride_x
                          + k_start)[:, None]
        w_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, _BK], W_SMEM)
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, _ROWS, _BK], X_SMEM)
        kw0 = gl.full([BLOCK_N, _BK], 0, gl.int32, layout=W_LOAD) + kw[None, :]
        kx0 = gl.full([_ROWS, _BK], 0, gl.int32, layout=X_LOAD) + kx[None, :]
        num_k = gl.multiple_of(k_end - k_start, 16)
        # The weight is no kernel's output: its first tiles are requested before waiting
        # for the previous kernel (programmatic dependent launch), x's after. Groups of
        # cp.async complete in order: W 0 .. S-2, x 0 .. S-2, then one W + x group a tile,
        # so waiting for all but the newest S - 1 groups leaves tile t's W and x landed.
        for i in gl.static_range(STAGES - 1):
            _issue_w(w_smem, i, w_ptrs, kw0, i * _BK, num_k)
            _async.commit_group()
        if USE_GDC:  # x may be the previous kernel's output
            gdc_wait()
        for i in gl.static_range(STAGES - 1):
            _issue_x(x_smem, i, x_ptrs, x_rows_ok, kx0, i * _BK, num_k)
            _async.commit_group()
        acc = gl.full([BLOCK_N, 8], 0.0, gl.float32, layout=MMA)
        for t in range(gl.cdiv(gl.maximum(num_k, 0), _BK)):
            _barrier()  # every lane is past its reads of the stage refilled here
            refill = (t + STAGES - 1) % STAGES
            _issue_w(w_smem, refill, w_ptrs, kw0, (t + STAGES - 1) * _BK, num_k)
            _issue_x(x_smem, refill, x_ptrs, x_rows_ok, kx0, (t + STAGES - 1) * _BK, num_k)
            _async.commit_group()
            _async.wait_group(STAGES - 1)
            _barrier()
            stage = t % STAGES
            w = _e4m3_to_bf16(w_smem.index(stage).load(W_LOAD))
            w = gl.convert_layout(_relabel_k(w), A_OP, assert_trivial=True)
            x = (x_smem.index(stage).load(X_LOAD).to(gl.float32) * 18446744073709551616.0
                 ).to(gl.bfloat16)  # x * 2^64
            x = gl.convert_layout(gl.permute(_relabel_k(x), [1, 0]), B_OP,
                                  assert_trivial=True)
            acc = mma_v2(w, x, acc)
        _async.wait_group(0)
        if USE_GDC:
            # The next kernel's programs may take SM slots now: this one's weight is read.
            gdc_launch_dependents()
        # acc[channel row, row of x], times 2^56 (the two scalings' product is 2^-56).
        acc = acc * 72057594037927936.0
        rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        xrows = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
        if SPLIT_K > 1:
            # Partial sums [split, row of x, weight row of the tile]; the last program of
            # the tile (counted by an atomic) adds them up and finishes.
            part = partial_ptr + ((pid_k * 8 + xrows[None, :]) * gl.num_programs(0) + tile) \
                * BLOCK_N + rows[:, None]
            gl.store(part, acc)
            _barrier()
            count = gl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if count == SPLIT_K - 1:
                acc = gl.full([BLOCK_N, 8], 0.0, gl.float32, layout=MMA)
                for split in range(SPLIT_K):
                    acc += gl.load(partial_ptr + ((split * 8 + xrows[None, :])
                                                  * gl.num_programs(0) + tile) * BLOCK_N
                                   + rows[:, None], cache_modifier=".cg")
                gl.store(lock_ptr + tile, 0)
                _finish(acc, rows, xrows, tile, scale_ptr, bias_ptr, y_ptr, num_rows,
                        num_out, stride_y, HAS_BIAS, SILU_OUT, BLOCK_N)
        else:
            _finish(acc, rows, xrows, tile, scale_ptr, bias_ptr, y_ptr, num_rows, num_out,
                    stride_y, HAS_BIAS, SILU_OUT, BLOCK_N)

    @gluon.jit
    def _finish(acc, rows, xrows, tile, scale_ptr, bias_ptr, y_ptr, num_rows, num_out,
                stride_y, HAS_BIAS: gl.constexpr, SILU_OUT: gl.constexpr,
                BLOCK_N: gl.constexpr):
        """Scale (and bias) the tile's sums ``acc [weight row, row of x]`` and store them
        (with SILU_OUT, ``silu(gate) * up``)."""
        if SILU_OUT:
            HALF: gl.constexpr = BLOCK_N // 2
            ch = tile * HALF + rows % HALF
            w_row = gl.where(rows < HALF, ch, num_out // 2 + ch)
            ok = ch < num_out // 2
        else:
            w_row = tile * BLOCK_N + rows
            ok = w_row < num_out
        out = acc * gl.load(scale_ptr + w_row, mask=ok, other=0.0)[:, None]
        if HAS_BIAS:
            out += gl.load(bias_ptr + w_row, mask=ok, other=0.0).to(gl.float32)[:, None]
        if SILU_OUT:
            # [2, HALF, 8] -> gate and up halves; rounded as kernels/silu_and_mul.py.
            gate, up = gl.split(gl.permute(gl.reshape(out, [2, HALF, 8]), [1, 2, 0]))
            out = silu_mul(gate.to(gl.bfloat16), up.to(gl.bfloat16))
            hrows = gl.arange(0, HALF, layout=gl.SliceLayout(1, out.type.layout))
            hx = gl.arange(0, 8, layout=gl.SliceLayout(0, out.type.layout))
            ch = tile * HALF + hrows
            gl.store(y_ptr + hx[None, :].to(gl.int64) * stride_y + ch[:, None],
                     out.to(y_ptr.dtype.element_ty),
                     mask=(ch < num_out // 2)[:, None] & (hx < num_rows)[None, :])
        else:
            gl.store(y_ptr + xrows[None, :].to(gl.int64) * stride_y + w_row[:, None],
                     out.to(y_ptr.dtype.element_ty),
                     mask=ok[:, None] & (xrows < num_rows)[None, :])


def serves(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None) -> bool:
    """Whether ``fp8_mma_gemv`` takes the product: 1-8 bfloat16 rows and an e4m3 weight with
    per-channel scales on a CUDA GPU of compute capability 9.0+, K a multiple of 16,
    16-byte aligned rows."""
    return (ENABLED and x.dtype == torch.bfloat16 and weight.dtype == FP8_DTYPE
            and weight_scale is not None and x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS
            and x.stride(1) == 1 and weight.stride(1) == 1 and x.shape[1] % 16 == 0
            and x.stride(0) % 8 == 0 and weight.stride(0) % 16 == 0
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and runs_on(x.device))


def split_k_for(tiles: int, num_in: int, programs_per_sm: int, device: torch.device) -> int:
    """Splits of K so that about ``programs_per_sm`` programs per SM stream the weight, each
    keeping at least two tiles of ``BLOCK_K``."""
    wanted = triton.cdiv(programs_per_sm * num_sms(device), tiles)
    return max(1, min(wanted, num_in // (2 * BLOCK_K)))


def fp8_mma_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, silu_out: bool = False,
                 config: tuple[int, int, int] | None = None,
                 use_gdc: bool | None = None) -> torch.Tensor:
    """``x @ (weight * weight_scale[:, None])^T + bias`` (``silu_and_mul`` of it with
    ``silu_out``: the weight's rows are ``[gate | up]``), where ``serves`` says so.

    Args:
        x: ``[M, K]`` bfloat16, 1 <= M <= 8.
        weight: ``[N, K]`` float8_e4m3fn; weight_scale: ``[N]`` float32.
        bias: ``[N]`` or None.
        config: ``(channels a program, stages, programs per SM for the split count)``.
        use_gdc: programmatic dependent launch; default where the device has it
            (``launch_dependent_args``).
    Returns:
        ``[M, N]`` bfloat16 (``[M, N // 2]`` with ``silu_out``).
    Raises:
        ValueError: an argument ``serves`` would refuse, naming it (``serves`` first is the
            callers' way; this guards direct calls).
    """
    check_tensor("x", x, ndim=2, dtypes=(torch.bfloat16,), last_dim_contiguous=True)
    check_tensor("weight", weight, ndim=2, dtypes=(FP8_DTYPE,), device=x.device,
                 last_dim_contiguous=True)
    num_rows, num_in = x.shape
    num_out = weight.shape[0]
    check_shape("weight", weight, (num_out, num_in))
    check_tensor("weight_scale", weight_scale, ndim=1, dtypes=(torch.float32,),
                 device=x.device, contiguous=True)
    check_shape("weight_scale", weight_scale, (num_out,))
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device, contiguous=True)
        check_shape("bias", bias, (num_out,))
    if not 1 <= num_rows <= MAX_ROWS:
        raise ValueError(f"x must have 1 to {MAX_ROWS} rows, got {num_rows}.")
    if silu_out and num_out % 2:
        raise ValueError(f"weight must have an even number of rows (gate | up) for "
                         f"silu_out, got {num_out}.")
    if not serves(x, weight, weight_scale):
        raise ValueError("fp8_mma_gemv needs a CUDA GPU of compute capability 9.0+ with "
                         "Gluon, K a multiple of 16 and 16-byte aligned rows of x and "
                         "weight.")
    block_n, stages, per_sm = config or DEFAULT_CONFIG
    if use_gdc is None:
        use_gdc = launch_dependent_args(x.device)["USE_GDC"]
    y = torch.empty((num_rows, num_out // 2 if silu_out else num_out), dtype=x.dtype,
                    device=x.device)
    tiles = triton.cdiv(num_out // 2 if silu_out else num_out,
                        block_n // 2 if silu_out else block_n)
    split_k = split_k_for(tiles, num_in, per_sm, x.device)
    k_per_split = triton.cdiv(triton.cdiv(num_in, split_k), BLOCK_K) * BLOCK_K
    split_k = triton.cdiv(num_in, k_per_split)
    partial, locks = split_k_workspace(split_k, 8, tiles * block_n, block_n, y)
    _fp8_mma_gemv_kernel[(tiles, split_k)](
        x, weight, weight_scale, bias if bias is not None else y, y, partial, locks,
        num_rows, num_out, num_in, x.stride(0), weight.stride(0), y.stride(0), k_per_split,
        HAS_BIAS=bias is not None, SILU_OUT=silu_out, SPLIT_K=split_k, BLOCK_N=block_n,
        STAGES=stages, USE_GDC=use_gdc, **_layouts(block_n), num_warps=1,
        **({"launch_pdl": True} if use_gdc else {}))
    return y
