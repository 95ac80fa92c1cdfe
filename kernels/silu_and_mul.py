"""SiLU-and-mul (the gated MLP activation): ``silu(x[..., :d]) * x[..., d:]``;
``silu_and_mul_quant_fp8`` also quantizes each row to e4m3 per token for an FP8 down
projection, in place of writing it out for ``kernels.fp8_quant`` to read back."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._utils import (
    FLOAT_DTYPES,
    check_tensor,
    gdc_launch_dependents,
    gdc_wait,
    launch_dependent_args,
    next_power_of_2,
)
from kernels.fp8 import FP8_DTYPE
from kernels.fp8_quant import row_launch, row_scale, to_e4m3


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, d, BLOCK: tl.constexpr,
                         USE_GDC: tl.constexpr = False):
    if USE_GDC:  # launched early: wait for the kernel that writes x
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    tl.store(out_ptr + row * stride_out + cols, _silu_and_mul(x_ptr + row * stride_x, cols, d),
             mask=mask)


@triton.jit
def silu_mul(gate, up):
    """``silu(gate) * up`` in ``gate``'s dtype, rounded as ``torch_ref.silu_and_mul`` rounds
    it (silu to the dtype before the product); also the GEMV's ``silu_out`` epilogue."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    return (act * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_and_mul(x_row_ptr, cols, d):
    """``silu(gate) * up`` at ``cols`` of the row (zeros past ``d``), in the input dtype."""
    mask = cols < d
    gate = tl.load(x_row_ptr + cols, mask=mask, other=0.0)
    up = tl.load(x_row_ptr + d + cols, mask=mask, other=0.0)
    return silu_mul(gate, up)


@triton.jit
def _silu_and_mul_quant_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, d, inv_max,
                               min_scale, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                               USE_GDC: tl.constexpr = False):
    """One row per program: the activation's amax, then its e4m3 values (ONE_PASS: the row
    in registers; otherwise computed twice, tile by tile)."""
    if USE_GDC:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    if ONE_PASS:  # BLOCK covers the row
        cols = tl.arange(0, BLOCK)
        y = _silu_and_mul(x_row, cols, d).to(tl.float32)
        scale = row_scale(tl.max(tl.abs(y), axis=0), inv_max, min_scale)
        tl.store(q_ptr + row * stride_q + cols, to_e4m3(y, scale, q_ptr.dtype.element_ty),
                 mask=cols < d)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, d, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(_silu_and_mul(x_row, cols, d).to(tl.float32)))
        scale = row_scale(tl.max(amax, axis=0), inv_max, min_scale)
        for c0 in range(0, d, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            y = _silu_and_mul(x_row, cols, d).to(tl.float32)
            tl.store(q_ptr + row * stride_q + cols, to_e4m3(y, scale, q_ptr.dtype.element_ty),
                     mask=cols < d)
    tl.store(scale_ptr + row, scale)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``torch_ref.silu_and_mul``.

    Args:
        x: ``[..., 2 * d]``, contiguous in the last dim.
    Returns:
        A new ``[..., d]`` tensor of ``x``'s dtype.
    """
    x2, d = _check_x(x)
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0 or d == 0:
        return out
    block = min(next_power_of_2(d), 1024)
    out2 = out.view(-1, d)
    grid = (x2.shape[0], triton.cdiv(d, block))
    _silu_and_mul_kernel[grid](x2, out2, x2.stride(0), out2.stride(0), d, BLOCK=block,
                               num_warps=4, **launch_dependent_args(x.device))
    return out


def silu_and_mul_quant_fp8(x: torch.Tensor, inv_max: float, min_scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``silu_and_mul`` followed by
    ``kernels.fp8_quant.per_token_quant_fp8``, in one launch and with the same values (each
    row is quantized as ``silu_and_mul`` stores it, in ``x``'s dtype).

    Args:
        x: ``[..., 2 * d]``, contiguous in the last dim.
        inv_max, min_scale: as ``per_token_quant_fp8`` takes them.
    Returns:
        ``q`` float8_e4m3fn ``[..., d]``, ``scale`` ``[rows, 1]`` float32.
    """
    x2, d = _check_x(x)
    q = torch.empty(*x.shape[:-1], d, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device)
    if x2.shape[0] == 0:
        return q, scale
    one_pass, block, num_warps = row_launch(d)
    q2 = q.view(x2.shape[0], d)
    _silu_and_mul_quant_kernel[(x2.shape[0],)](
        x2, q2, scale, x2.stride(0), q2.stride(0), d, float(inv_max), float(min_scale),
        BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps,
        **launch_dependent_args(x.device))
    return q, scale


def _check_x(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` as a ``[rows, 2 * d]`` view, and ``d``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dim, got shape {tuple(x.shape)}.")
    d = x.shape[-1] // 2
    return x.reshape(math.prod(x.shape[:-1]), 2 * d), d
