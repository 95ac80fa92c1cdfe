"""Per-token FP8 quantization of activations in one launch.

``q[i] = x[i] * (1 / s[i])`` in e4m3 with ``s[i] = max(amax(|x[i]|) * inv_max, min_scale)``
(``inv_max`` = 1 / 448 as a float32), as ``worker_svc.layers.quantization.quantize_per_row``
computes it with torch: the same float32 products, a correctly rounded reciprocal, the same
clamp and round-to-nearest-even, so the two give the same values (a tiny negative input may
round to +0 where torch gives -0). One program per row: one launch instead of the six or
seven small kernels of the torch expression, which at batch 1 cost more than the FP8 GEMMs
save. A row of up to ``_ONE_PASS_MAX`` elements is read once into registers (one load's
latency per row, where a loop of tiles waits on each tile twice: for the maximum, then for
the store); a longer row is read twice, tile by tile.

``row_scale`` and ``to_e4m3`` are the two steps as ``@triton.jit`` helpers, for kernels that
quantize the row they produce (``kernels.rms_norm.rms_norm_quant_fp8``,
``kernels.silu_and_mul.silu_and_mul_quant_fp8``) instead of writing it for this kernel to
read back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import FLOAT_DTYPES, check_tensor
from kernels.fp8 import FP8_DTYPE
from kernels.kv_cache_write import _round_to_e4m3

_BLOCK = 1024
# Longest row read once (16 warps: 32 float32 values per thread at 16384).
_ONE_PASS_MAX = 16384


@triton.jit
def row_scale(amax, inv_max, min_scale):
    """A row's scale from its largest magnitude: ``max(amax * inv_max, min_scale)``."""
    return tl.maximum(amax * inv_max, min_scale)


@triton.jit
def to_e4m3(y, scale, out_ty: tl.constexpr):
    """float32 ``y / scale`` saturated to +-448 and rounded to e4m3 (ties to even), as
    ``out_ty`` (the e4m3 element type); the division is a product with the correctly
    rounded reciprocal, as torch computes it."""
    q = tl.minimum(tl.maximum(y * tl.div_rn(1.0, scale), -448.0), 448.0)
    return _round_to_e4m3(q).to(out_ty)


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, num_cols, inv_max,
                            min_scale, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if ONE_PASS:  # BLOCK covers the row
        cols = tl.arange(0, BLOCK)
        mask = cols < num_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        scale = row_scale(tl.max(tl.abs(x), axis=0), inv_max, min_scale)
        tl.store(q_ptr + row * stride_q + cols, to_e4m3(x, scale, q_ptr.dtype.element_ty),
                 mask=mask)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, num_cols, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_x + cols, mask=cols < num_cols, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = row_scale(tl.max(amax, axis=0), inv_max, min_scale)
        for c0 in range(0, num_cols, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < num_cols
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
            tl.store(q_ptr + row * stride_q + cols,
                     to_e4m3(x.to(tl.float32), scale, q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def per_token_quant_fp8(x: torch.Tensor, inv_max: float, min_scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [M, K] float8_e4m3fn, scale [M, 1] float32)`` of ``x [M, K]``; ``inv_max`` is
    ``1 / 448`` (``worker_svc.layers.quantization.INV_FP8_MAX``).

    Raises:
        ValueError: ``x`` is not a 2-D floating tensor with a contiguous last dim.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    num_rows, num_cols = x.shape
    q = torch.empty((num_rows, num_cols), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((num_rows, 1), dtype=torch.float32, device=x.device)
    if num_rows:
        one_pass, block, num_warps = row_launch(num_cols)
        _per_token_quant_kernel[(num_rows,)](x, q, scale, x.stride(0), q.stride(0), num_cols,
                                             float(inv_max), float(min_scale), BLOCK=block,
                                             ONE_PASS=one_pass, num_warps=num_warps)
    return q, scale


def row_launch(num_cols: int) -> tuple[bool, int, int]:
    """``(one pass, block, warps)`` for a program that quantizes a row of ``num_cols``: the
    whole row in registers up to ``_ONE_PASS_MAX`` (16 warps at most: 32 float32 values
    per thread), else tiles of ``_BLOCK`` read twice."""
    one_pass = num_cols <= _ONE_PASS_MAX
    block = triton.next_power_of_2(max(num_cols, 1)) if one_pass else _BLOCK
    return one_pass, block, min(16, max(4, block // 1024))
