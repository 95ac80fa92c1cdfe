"""SiLU-and-mul (the gated MLP activation): ``silu(x[..., :d]) * x[..., d:]``."""

from __future__ import annotations

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


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, d, BLOCK: tl.constexpr,
                         USE_GDC: tl.constexpr = False):
    if USE_GDC:  # launched early: wait for the kernel that writes x
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # Round silu to the input dtype before the product, as the reference does.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up.to(tl.float32)).to(gate.dtype),
             mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``torch_ref.silu_and_mul``.

    Args:
        x: ``[..., 2 * d]``, contiguous in the last dim.
    Returns:
        A new ``[..., d]`` tensor of ``x``'s dtype.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dim, got shape {tuple(x.shape)}.")
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0 or d == 0:
        return out
    block = min(next_power_of_2(d), 1024)
    out2 = out.view(-1, d)
    grid = (x2.shape[0], triton.cdiv(d, block))
    _silu_and_mul_kernel[grid](x2, out2, x2.stride(0), out2.stride(0), d, BLOCK=block,
                               num_warps=4, **launch_dependent_args(x.device))
    return out
