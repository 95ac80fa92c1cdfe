"""``y = (x @ W^T) * s + b`` for one to four rows of ``x``: decode's linear layers.

At these sizes a linear layer is the time to read ``W`` once; cuBLAS reaches that for the
wide gate/up and LM-head matrices but not for the smaller q/k/v and o shapes (several
waves of a tile kernel, then a split-K reduction launch). This kernel is a plain
multiply-add over the weight: each program owns ``BLOCK_N`` output channels, streams their
weight rows along K in ``[BLOCK_N, BLOCK_K]`` tiles (converted to float32 in registers:
bf16, fp16, fp32 or e4m3 weights; the next tile requested before the current one is used),
keeps one float32 partial per element of the tile and sums it once at the end, so the loop
is loads and FMAs only. ``SPLIT_K > 1`` spreads K over that many programs per column block
to keep every SM streaming when N is small; their float32 partials are added in split
order by the last program of the block (a counter per block, reset by that program), so
the result does not depend on which program finished first and a second launch gives the
same bits.

With programmatic dependent launch (``kernels._utils.launch_dependent_args``) the programs
start while the previous kernel finishes: they request their first weight tile (the step
never writes a weight), then wait for that kernel before reading ``x``. ``gated`` fuses
the gated MLP's ``silu(gate) * up`` into the down projection's reads of ``x``.
On an H200 it beats cuBLAS at one row and loses from two (each row adds an FMA per weight
element; see docs/performance.md), so the model runs it for one row only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import (
    FLOAT_DTYPES,
    check_shape,
    check_tensor,
    gdc_launch_dependents,
    gdc_wait,
    is_interpreter,
    launch_dependent_args,
    num_sms,
    split_k_workspace,
)
from kernels.fp8 import FP8_DTYPE

# Rows of x one launch takes; callers use a GEMM beyond.
MAX_ROWS = 4
WEIGHT_DTYPES = FLOAT_DTYPES + (FP8_DTYPE,)
# (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K); SPLIT_K 0: chosen from the shape.
Config = tuple[int, int, int, int, int]
# Programs per SM that keep enough weight bytes in flight (the split count aims for it).
_PROGRAMS_PER_SM = 4


@triton.jit
def _x_tile(ptrs, k_ok, num_in, res_ptrs, norm_w_ptrs, rstd, MASKED: tl.constexpr,
            GATED: tl.constexpr, NORM: tl.constexpr):
    """A tile of one row of x in float32.

    GATED: the row is ``[gate | up]`` (2 * num_in) and the tile is ``silu(gate) * up``,
    rounded as ``kernels/silu_and_mul.py`` rounds it. NORM: the tile is
    ``rms_norm(x + residual)`` with the row's ``rstd``, rounded as ``kernels/rms_norm.py``
    rounds it."""
    if MASKED:
        x = tl.load(ptrs, mask=k_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    if GATED:
        if MASKED:
            up = tl.load(ptrs + num_in, mask=k_ok, other=0.0)
        else:
            up = tl.load(ptrs + num_in)
        g = x.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32)
        x = (act * up.to(tl.float32)).to(x.dtype)
    if NORM:
        if MASKED:
            r = tl.load(res_ptrs, mask=k_ok, other=0.0)
            nw = tl.load(norm_w_ptrs, mask=k_ok, other=0.0)
        else:
            r = tl.load(res_ptrs)
            nw = tl.load(norm_w_ptrs)
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype).to(tl.float32)
        normed = (h * rstd).to(x.dtype).to(tl.float32)
        x = (normed * nw.to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, partial_ptr, lock_ptr,
                 res_ptr, norm_w_ptr, res_out_ptr, eps,
                 num_out, num_in, stride_x, stride_w, stride_y,
                 ROWS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 EVEN_K: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
                 BLOCK_H: tl.constexpr, USE_GDC: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < num_out
    # Columns past the end read the last row (never stored): the loads need no column mask.
    safe_cols = tl.minimum(cols, num_out - 1)
    ks = tl.arange(0, BLOCK_K)
    # This program's share of K: whole BLOCK_K tiles, the last share shorter.
    k_per_split = tl.cdiv(tl.cdiv(num_in, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, num_in)
    w_ptrs = w_ptr + safe_cols[:, None].to(tl.int64) * stride_w + (k_start + ks)[None, :]
    x_ptrs = x_ptr + k_start + ks
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    # The first weight tile is requested before waiting for the previous kernel (with
    # programmatic dependent launch): the weight is never written by the step, only x is.
    w_next = tl.load(w_ptrs, mask=((k_start + ks) < k_end)[None, :], other=0.0,
                     eviction_policy="evict_first")
    if USE_GDC:
        gdc_launch_dependents()
        gdc_wait()
    rstd = 0.0
    res_ptrs = x_ptrs
    norm_w_ptrs = x_ptrs
    if NORM:
        # x + residual over the whole row (one row): every program takes its norm; the
        # first program also writes the sum, the next layer's residual.
        hs = tl.arange(0, BLOCK_H)
        h_ok = hs < num_in
        h = (tl.load(x_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
             + tl.load(res_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
             ).to(x_ptr.dtype.element_ty)
        if (pid == 0) & (pid_k == 0):
            tl.store(res_out_ptr + hs, h, mask=h_ok)
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / num_in + eps)
        res_ptrs = res_ptr + k_start + ks
        norm_w_ptrs = norm_w_ptr + k_start + ks
    for k0 in range(k_start, k_end, BLOCK_K):
        w = w_next.to(tl.float32)
        # The next tile's loads are issued before this tile's products (double buffering).
        w_ptrs += BLOCK_K
        if EVEN_K:
            # A mask uniform along K (k_end is a whole tile away or not): loads stay vectors.
            more = (tl.zeros([1, BLOCK_K], dtype=tl.int32) + (k0 + BLOCK_K)) < k_end
            w_next = tl.load(w_ptrs, mask=more, other=0.0, eviction_policy="evict_first")
            k_ok = more  # unused: the x tiles are read whole
        else:
            k_ok = (k0 + ks) < k_end
            w_next = tl.load(w_ptrs, mask=((k0 + BLOCK_K + ks) < k_end)[None, :], other=0.0,
                             eviction_policy="evict_first")
        acc0 += w * _x_tile(x_ptrs, k_ok, num_in, res_ptrs, norm_w_ptrs, rstd, not EVEN_K,
                            GATED, NORM)[None, :]
        if ROWS > 1:  # (NORM takes one row)
            acc1 += w * _x_tile(x_ptrs + stride_x, k_ok, num_in, x_ptrs, x_ptrs, rstd,
                                not EVEN_K, GATED, False)[None, :]
        if ROWS > 2:
            acc2 += w * _x_tile(x_ptrs + 2 * stride_x, k_ok, num_in, x_ptrs, x_ptrs, rstd,
                                not EVEN_K, GATED, False)[None, :]
        if ROWS > 3:
            acc3 += w * _x_tile(x_ptrs + 3 * stride_x, k_ok, num_in, x_ptrs, x_ptrs, rstd,
                                not EVEN_K, GATED, False)[None, :]
        x_ptrs += BLOCK_K
        res_ptrs += BLOCK_K
        norm_w_ptrs += BLOCK_K
    out0 = tl.sum(acc0, axis=1)
    out1 = tl.sum(acc1, axis=1)
    out2 = tl.sum(acc2, axis=1)
    out3 = tl.sum(acc3, axis=1)
    is_last = True
    if SPLIT_K > 1:
        # Each program leaves its float32 partials (ROWS planes of num_out); the last of a
        # column block's programs adds them in split order and resets the counter.
        base = partial_ptr + pid_k * (ROWS * num_out) + cols
        tl.store(base, out0, mask=col_ok)
        if ROWS > 1:
            tl.store(base + num_out, out1, mask=col_ok)
        if ROWS > 2:
            tl.store(base + 2 * num_out, out2, mask=col_ok)
        if ROWS > 3:
            tl.store(base + 3 * num_out, out3, mask=col_ok)
        tl.debug_barrier()
        count = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
        is_last = count == SPLIT_K - 1
        if is_last:
            out0 = tl.zeros([BLOCK_N], dtype=tl.float32)
            out1 = out0
            out2 = out0
            out3 = out0
            for split in range(SPLIT_K):
                # .cg: from L2, never a stale line of this SM's L1.
                base = partial_ptr + split * (ROWS * num_out) + cols
                out0 += tl.load(base, mask=col_ok, other=0.0, cache_modifier=".cg")
                if ROWS > 1:
                    out1 += tl.load(base + num_out, mask=col_ok, other=0.0,
                                    cache_modifier=".cg")
                if ROWS > 2:
                    out2 += tl.load(base + 2 * num_out, mask=col_ok, other=0.0,
                                    cache_modifier=".cg")
                if ROWS > 3:
                    out3 += tl.load(base + 3 * num_out, mask=col_ok, other=0.0,
                                    cache_modifier=".cg")
            tl.store(lock_ptr + pid, 0)
    if is_last:
        if HAS_SCALE:
            scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
            out0 = out0 * scale
            out1 = out1 * scale
            out2 = out2 * scale
            out3 = out3 * scale
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            out0 = out0 + bias
            out1 = out1 + bias
            out2 = out2 + bias
            out3 = out3 + bias
        y_ptrs = y_ptr + cols
        tl.store(y_ptrs, out0.to(y_ptr.dtype.element_ty), mask=col_ok)
        if ROWS > 1:
            tl.store(y_ptrs + stride_y, out1.to(y_ptr.dtype.element_ty), mask=col_ok)
        if ROWS > 2:
            tl.store(y_ptrs + 2 * stride_y, out2.to(y_ptr.dtype.element_ty), mask=col_ok)
        if ROWS > 3:
            tl.store(y_ptrs + 3 * stride_y, out3.to(y_ptr.dtype.element_ty), mask=col_ok)


def config_for(num_out: int, num_in: int, weight_bytes: int = 2) -> Config:
    """16-bit weights: four output channels per program (the most programs: the shortest
    tail), in tiles of 1024 along K for a wide output (q/k/v, gate/up, the LM head), else 512
    (o, down): the best or within 2% of the best of a sweep over the Llama-3-8B shapes on an
    H200. e4m3 weights: 16 channels by 512 (each tile of x is converted to the weight tile's
    register layout once per tile, so more channels per tile pay for it). In Triton's CPU
    interpreter: 32 channels, fewer programs to step through."""
    if is_interpreter():
        return (32, 256, 4, 1, 0)
    if weight_bytes == 1:
        return (16, 512, 4, 1, 0)
    return (4, 1024 if num_out > num_in else 512, 4, 1, 0)


def split_k_for(num_out: int, num_in: int, block_n: int, block_k: int,
                device: torch.device) -> int:
    """Splits of K per column block so that about ``_PROGRAMS_PER_SM`` programs per SM
    stream the weight, each keeping at least two tiles of K."""
    blocks = triton.cdiv(num_out, block_n)
    wanted = triton.cdiv(_PROGRAMS_PER_SM * num_sms(device), blocks)
    return max(1, min(wanted, num_in // (2 * block_k)))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         weight_scale: torch.Tensor | None = None, config: Config | None = None,
         gated: bool = False) -> torch.Tensor:
    """``x @ (weight * weight_scale[:, None])^T + bias`` in ``x``'s dtype, float32 sums.

    Args:
        x: ``[M, K]`` activations, ``1 <= M <= MAX_ROWS``, last dim contiguous; with
            ``gated``, ``[M, 2K]`` rows ``[gate | up]`` that enter the product as
            ``silu(gate) * up`` (the gated MLP's activation, fused into the down
            projection; the same values as ``kernels.silu_and_mul``).
        weight: ``[N, K]`` bf16, fp16, fp32 or float8_e4m3fn, last dim contiguous.
        bias: ``[N]`` or None.
        weight_scale: ``[N]`` float32 per output channel, or None.
        config: ``(BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K)``; default
            ``config_for`` the shape; SPLIT_K 0 picks the split count from the shape and the
            SM count (``split_k_for``).
    Returns:
        ``[M, N]`` in ``x.dtype``.
    Raises:
        ValueError: an argument of the wrong shape, dtype or device, naming it.
    """
    return _launch(x, weight, bias, weight_scale, config, gated, None)[0]


def rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                  eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  weight_scale: torch.Tensor | None = None, config: Config | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``gemv(rms_norm(x + residual) * norm_weight, ...)`` for one row, and ``x + residual``
    (the next residual): the decoder's add-and-norm fused into the projection after it, with
    the values of ``kernels.rms_norm.rms_norm(x, norm_weight, eps, residual)``.

    Args:
        x, residual: ``[1, K]`` of one dtype, last dim contiguous.
        norm_weight: ``[K]`` of x's dtype.
        eps: the norm's epsilon.
        weight, bias, weight_scale, config: as for ``gemv``.
    Returns:
        ``(y [1, N], x + residual [1, K])``; ``residual`` is not written.
    Raises:
        ValueError: an argument of the wrong shape, dtype or device, naming it.
    """
    check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=x.device,
                 last_dim_contiguous=True)
    check_shape("residual", residual, tuple(x.shape))
    check_tensor("norm_weight", norm_weight, ndim=1, dtypes=(x.dtype,), device=x.device,
                 contiguous=True)
    check_shape("norm_weight", norm_weight, (x.shape[-1],))
    if x.shape[0] != 1:
        raise ValueError(f"x must have 1 row for the fused norm, got {x.shape[0]}.")
    return _launch(x, weight, bias, weight_scale, config, False,
                   (residual, norm_weight, float(eps)))


def _launch(x, weight, bias, weight_scale, config, gated, norm):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor("weight", weight, ndim=2, dtypes=WEIGHT_DTYPES, device=x.device,
                 last_dim_contiguous=True)
    num_rows, num_in = x.shape
    if gated:
        if num_in % 2:
            raise ValueError(f"x must have an even last dim (gate | up), got {num_in}.")
        num_in //= 2
    num_out = weight.shape[0]
    if not 1 <= num_rows <= MAX_ROWS:
        raise ValueError(f"x must have 1 to {MAX_ROWS} rows, got {num_rows}.")
    check_shape("weight", weight, (num_out, num_in))
    if weight_scale is not None:
        check_tensor("weight_scale", weight_scale, dtypes=(torch.float32,), device=x.device,
                     contiguous=True)
        check_shape("weight_scale", weight_scale, (num_out,))
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, device=x.device, contiguous=True)
        check_shape("bias", bias, (num_out,))
    y = torch.empty((num_rows, num_out), dtype=x.dtype, device=x.device)
    residual_out = None
    if norm is not None:
        residual_out = torch.empty_like(x)
        if num_in == 0 or num_out == 0:  # nothing to launch: the sum alone
            residual_out = (x.float() + norm[0].float()).to(x.dtype)
    if num_out == 0:
        return y, residual_out
    if num_in == 0:
        return (y.zero_() if bias is None else y.copy_(bias.expand_as(y))), residual_out
    block_n, block_k, num_warps, num_stages, split_k = config or config_for(
        num_out, num_in, weight.element_size())
    block_k = min(block_k, triton.next_power_of_2(num_in))
    if split_k == 0:
        split_k = split_k_for(num_out, num_in, block_n, block_k, x.device)
    num_blocks = triton.cdiv(num_out, block_n)
    partial, locks = split_k_workspace(split_k, num_rows, num_out, block_n, y)
    k_per_split = triton.cdiv(triton.cdiv(num_in, split_k), block_k) * block_k
    residual, norm_weight, eps = norm if norm is not None else (x, x, 0.0)
    _gemv_kernel[(num_blocks, split_k)](
        x, weight, weight_scale if weight_scale is not None else y,
        bias if bias is not None else y, y, partial, locks,
        residual, norm_weight, residual_out if residual_out is not None else x, eps,
        num_out, num_in, x.stride(0), weight.stride(0), y.stride(0),
        ROWS=num_rows, HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        EVEN_K=num_in % k_per_split == 0, GATED=gated, NORM=norm is not None,
        BLOCK_H=triton.next_power_of_2(num_in) if norm is not None else 1,
        num_warps=num_warps, num_stages=num_stages, **launch_dependent_args(x.device))
    return y, residual_out
