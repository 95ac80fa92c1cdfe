"""``y = (x @ W^T) * s + b`` for a few rows of ``x`` and an e4m3 weight: decode's GEMM.

At decode batch sizes the product is bound by reading ``W``; an FP8 weight halves those
bytes, but the FP8 tensor-core GEMM (``torch._scaled_mm``) first needs the activations
quantized and pads the few rows to a tile. This kernel reads the e4m3 weight, converts each
tile to the activations' dtype in registers (exact: every e4m3 value is a bf16 and an fp16
value) and multiplies by the unquantized activations with ``tl.dot`` (rows padded to 16
in registers only), then applies the per-output-channel scale and the bias once per output.
Each program owns ``BLOCK_N`` output channels and streams their weight rows along K
(optionally split over ``SPLIT_K`` programs whose float32 partials are added in a fixed
order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import FLOAT_DTYPES, check_shape, check_tensor, split_k_workspace
from kernels.fp8 import FP8_DTYPE

# Rows of x one launch takes (tl.dot's smallest M tile); callers use the FP8 GEMM beyond.
MAX_ROWS = 16
# (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K) of the tl.dot kernel.
DEFAULT_CONFIG = (32, 256, 4, 4, 1)


@triton.jit
def _w8_matmul_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, partial_ptr, lock_ptr,
                      num_rows, num_out, num_in, stride_x, stride_w, stride_y,
                      HAS_BIAS: tl.constexpr, IS_FP32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)  # every row of x: one row block
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
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
        if IS_FP32:
            acc = tl.dot(x, w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    is_last = True
    if SPLIT_K > 1:
        # Split K: each program leaves its float32 partial sums; the last of a column
        # block's programs to finish (a counter per block, reset by that program) adds them
        # in split order, so the result does not depend on which program finished when.
        plane = BLOCK_M * num_out
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
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fp8_weight_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None = None,
                      config: tuple[int, int, int, int, int] = DEFAULT_CONFIG) -> torch.Tensor:
    """``(x @ (weight * weight_scale[:, None])^T + bias)`` in ``x``'s dtype.

    Args:
        x: ``[M, K]`` activations, ``M <= MAX_ROWS``, last dim contiguous.
        weight: ``[N, K]`` float8_e4m3fn, last dim contiguous.
        weight_scale: ``[N]`` float32, one scale per output channel.
        bias: ``[N]`` or None.
        config: ``(BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K)``; SPLIT_K > 1 spreads
            K over that many programs per column block (float32 partials, added in a fixed
            order).
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
    block_n, block_k, num_warps, num_stages, split_k = config
    num_blocks = triton.cdiv(num_out, block_n)
    partial, locks = split_k_workspace(split_k, MAX_ROWS, num_out, block_n, y)
    _w8_matmul_kernel[(num_blocks, split_k)](
        x, weight, weight_scale, bias if bias is not None else y, y, partial, locks,
        num_rows, num_out, num_in, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, IS_FP32=x.dtype == torch.float32, BLOCK_M=MAX_ROWS,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=num_warps,
        num_stages=num_stages)
    return y
