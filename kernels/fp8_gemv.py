"""``y = (x @ W^T) * s + b`` for a few rows of ``x`` and an e4m3 weight: decode's GEMM.

At decode batch sizes the product is bound by reading ``W``; an FP8 weight halves those
bytes, but the FP8 tensor-core GEMM (``torch._scaled_mm``) first needs the activations
quantized and pads the few rows to a tile. This kernel reads the e4m3 weight, converts each
tile to the activations' dtype in registers (exact: every e4m3 value is a bf16 and an fp16
value) and multiplies by the unquantized activations with ``tl.dot`` (rows padded to 16
in registers only), then applies the per-output-channel scale and the bias once per output.
Each program owns ``BLOCK_N`` output channels and streams their weight rows along K. Up to
``MAX_GEMV_ROWS`` rows a second kernel does without tensor cores: float32 multiply-adds in
registers, a few output channels per program, many programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import FLOAT_DTYPES, check_shape, check_tensor
from kernels.fp8 import FP8_DTYPE

# Rows of x one launch takes (tl.dot's smallest M tile); callers use the FP8 GEMM beyond.
MAX_ROWS = 16
# Up to this many rows the multiply-add kernel runs (no tensor cores, no shared memory).
MAX_GEMV_ROWS = 4
# (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K) of the tl.dot kernel.
DEFAULT_CONFIG = (32, 256, 4, 4, 1)
# (BLOCK_N, BLOCK_K, num_warps) of the multiply-add kernel.
DEFAULT_GEMV_CONFIG = (4, 1024, 4)


@triton.jit
def _w8_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, num_rows, num_out, num_in,
                    stride_x, stride_w, stride_y, HAS_BIAS: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Like a reduction over K: each thread keeps its own partial products of a
    # [ROWS, BLOCK_N, BLOCK_K] tile and they are summed once at the end, so the loop is
    # loads and multiply-adds only and many small programs keep the memory system busy.
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < num_rows
    col_ok = cols < num_out
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
    acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, num_in, BLOCK_K):
        k_ok = (k0 + ks) < num_in
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = tl.sum(acc, axis=2) * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _w8_matmul_kernel(x_ptr, x_scale_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, partial_ptr,
                      lock_ptr, num_rows, num_out, num_in, stride_x, stride_w, stride_y,
                      HAS_BIAS: tl.constexpr, IS_FP32: tl.constexpr, IS_FP8_X: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr):
    num_col_blocks = tl.cdiv(num_out, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_col_blocks
    pid_n = pid % num_col_blocks
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < num_rows
    col_ok = cols < num_out
    # This program's share of K: whole BLOCK_K tiles, the last share shorter.
    k_per_split = tl.cdiv(tl.cdiv(num_in, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, num_in)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + (k_start + ks)[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_w + (k_start + ks)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = (k0 + ks) < k_end
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IS_FP8_X:
            acc = tl.dot(x, w, acc)  # e4m3 x e4m3 on the tensor cores
        elif IS_FP32:
            acc = tl.dot(x, w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    is_last = True
    if SPLIT_K > 1:
        # Split K: each program leaves its float32 partial sums; the last of a tile's
        # programs to finish (a counter per tile, reset by that program) adds them in split
        # order, so the result does not depend on which program finished when.
        plane = tl.num_programs(0) // num_col_blocks * BLOCK_M * num_out
        offsets = rows[:, None] * num_out + cols[None, :]
        tl.store(partial_ptr + pid_k * plane + offsets, acc, mask=col_ok[None, :])
        tl.debug_barrier()
        count = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
        is_last = count == SPLIT_K - 1
        if is_last:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for split in range(SPLIT_K):
                # .cg: from L2, never a stale line of this SM's L1.
                acc += tl.load(partial_ptr + split * plane + offsets, mask=col_ok[None, :],
                               other=0.0, cache_modifier=".cg")
            tl.store(lock_ptr + pid, 0)
    if is_last:
        if IS_FP8_X:
            acc = acc * tl.load(x_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Per device: the split-K counters, zero between launches (each launch resets its own).
_LOCKS: dict[torch.device, torch.Tensor] = {}
_MAX_TILES = 1 << 16


def _locks(device: torch.device) -> torch.Tensor:
    locks = _LOCKS.get(device)
    if locks is None:
        # Allocated at the first launch (a warm-up step), never inside a graph capture.
        locks = _LOCKS[device] = torch.zeros(_MAX_TILES, dtype=torch.int32, device=device)
    return locks


def fp8_weight_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None = None,
                      config: tuple[int, int, int, int, int] = DEFAULT_CONFIG,
                      gemv_config: tuple[int, int, int] = DEFAULT_GEMV_CONFIG) -> torch.Tensor:
    """``(x @ (weight * weight_scale[:, None])^T + bias)`` in ``x``'s dtype.

    Args:
        x: ``[M, K]`` activations, ``M <= MAX_ROWS``, last dim contiguous.
        weight: ``[N, K]`` float8_e4m3fn, last dim contiguous.
        weight_scale: ``[N]`` float32, one scale per output channel.
        bias: ``[N]`` or None.
        config: ``(BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K)`` of the tl.dot kernel
            (more than ``MAX_GEMV_ROWS`` rows); SPLIT_K > 1 spreads K over that many
            programs per column block (float32 partials, added in a fixed order).
        gemv_config: ``(BLOCK_N, BLOCK_K, num_warps)`` of the multiply-add kernel (up to
            ``MAX_GEMV_ROWS`` rows).
    Returns:
        ``[M, N]`` in ``x.dtype``.
    Raises:
        ValueError: an argument of the wrong shape, dtype or device, naming it.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor("weight", weight, ndim=2, dtypes=(FP8_DTYPE,), device=x.device,
                 last_dim_contiguous=True)
    num_rows, num_in = x.shape
    num_out = weight.shape[0]
    if num_rows > MAX_ROWS:
        raise ValueError(f"x must have at most {MAX_ROWS} rows, got {num_rows}.")
    check_shape("weight", weight, (num_out, num_in))
    check_tensor("weight_scale", weight_scale, dtypes=(torch.float32,), device=x.device,
                 contiguous=True)
    check_shape("weight_scale", weight_scale, (num_out,))
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, device=x.device, contiguous=True)
        check_shape("bias", bias, (num_out,))
    y = torch.empty((num_rows, num_out), dtype=x.dtype, device=x.device)
    if num_rows == 0 or num_out == 0:
        return y
    bias_arg = bias if bias is not None else y
    if num_rows <= MAX_GEMV_ROWS:
        block_n, block_k, num_warps = gemv_config
        _w8_gemv_kernel[(triton.cdiv(num_out, block_n),)](
            x, weight, weight_scale, bias_arg, y, num_rows, num_out, num_in, x.stride(0),
            weight.stride(0), y.stride(0), HAS_BIAS=bias is not None,
            ROWS=1 if num_rows == 1 else (2 if num_rows == 2 else 4), BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=num_warps)
        return y
    _launch_dot(x, None, weight, weight_scale, bias, y, MAX_ROWS, config)
    return y


def fp8_matmul(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
               weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
               config: tuple[int, int, int, int, int, int] = (64, 64, 128, 4, 4, 1)
               ) -> torch.Tensor:
    """``(x_q * x_scale) @ (weight * weight_scale[:, None])^T + bias``: e4m3 activations
    (one scale per row) times e4m3 weights on the tensor cores, any number of rows.

    Args:
        x_q: ``[M, K]`` float8_e4m3fn. x_scale: ``[M, 1]`` or ``[M]`` float32.
        weight, weight_scale, bias: as for ``fp8_weight_matmul``.
        config: ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K)``.
    """
    check_tensor("x_q", x_q, ndim=2, dtypes=(FP8_DTYPE,), last_dim_contiguous=True)
    check_tensor("weight", weight, ndim=2, dtypes=(FP8_DTYPE,), device=x_q.device,
                 last_dim_contiguous=True)
    num_rows, num_in = x_q.shape
    check_shape("weight", weight, (weight.shape[0], num_in))
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,), device=x_q.device,
                 contiguous=True)
    if x_scale.numel() != num_rows:
        raise ValueError(f"x_scale must have {num_rows} values, got {x_scale.numel()}.")
    y = torch.empty((num_rows, weight.shape[0]), dtype=out_dtype, device=x_q.device)
    if num_rows and weight.shape[0]:
        _launch_dot(x_q, x_scale, weight, weight_scale, bias, y, config[0], config[1:])
    return y


def _launch_dot(x, x_scale, weight, weight_scale, bias, y, block_m: int, config) -> None:
    block_n, block_k, num_warps, num_stages, split_k = config
    num_rows, num_out = y.shape
    num_tiles = triton.cdiv(num_rows, block_m) * triton.cdiv(num_out, block_n)
    if split_k > 1:
        if num_tiles > _MAX_TILES:
            raise ValueError(f"{num_tiles} output tiles: more than {_MAX_TILES} for split-K.")
        partial = torch.empty(split_k * triton.cdiv(num_rows, block_m) * block_m * num_out,
                              dtype=torch.float32, device=x.device)
        locks = _locks(x.device)
    else:
        partial = locks = y
    _w8_matmul_kernel[(num_tiles, split_k)](
        x, x_scale if x_scale is not None else y, weight, weight_scale,
        bias if bias is not None else y, y, partial, locks, num_rows, num_out,
        x.shape[1], x.stride(0), weight.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        IS_FP32=x.dtype == torch.float32, IS_FP8_X=x_scale is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=num_warps,
        num_stages=num_stages)
