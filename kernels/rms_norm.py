"""RMSNorm with an optional fused residual add (one program per row)."""

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
    launch_dependent_args,
    next_power_of_2,
)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                     stride_x, stride_res, stride_out, stride_res_out,
                     hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     USE_GDC: tl.constexpr = False):
    if USE_GDC:  # launched early: wait for the kernel that writes x
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Round the sum to the activation dtype first, as the reference does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``torch_ref.rms_norm``.

    Args:
        x: ``[..., hidden]`` activations, contiguous in the last dim.
        weight: ``[hidden]`` scale.
        eps: added to the mean square.
        residual: optional tensor shaped like ``x``, added to ``x`` before the norm.
    Returns:
        The normed tensor (dtype ``promote(x, weight)``), or ``(normed, x + residual)``
        with residual; all outputs are new tensors.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() < 1:
        raise ValueError("x must have at least one dim.")
    hidden = x.shape[-1]
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device,
                 contiguous=True)
    check_shape("weight", weight, (hidden,))
    x2 = x.reshape(-1, hidden)
    res2 = None
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device,
                     last_dim_contiguous=True)
        check_shape("residual", residual, tuple(x.shape))
        res2 = residual.reshape(-1, hidden)
    num_rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype),
                      device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    if num_rows == 0:
        return out if res_out is None else (out, res_out)
    block = next_power_of_2(hidden)
    num_warps = max(1, min(16, block // 512))
    out2 = out.view(-1, hidden)
    res_out2 = res_out.view(-1, hidden) if res_out is not None else out2
    _rms_norm_kernel[(num_rows,)](
        x2, res2 if res2 is not None else x2, weight, out2, res_out2,
        x2.stride(0), res2.stride(0) if res2 is not None else 0, out2.stride(0),
        res_out2.stride(0), hidden, float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
        **launch_dependent_args(x.device))
    return out if res_out is None else (out, res_out)
