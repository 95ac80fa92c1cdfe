"""RMSNorm with an optional fused residual add (one program per row); ``rms_norm_quant_fp8``
also quantizes the normed row to e4m3 per token for an FP8 linear layer, in place of
writing it out for ``kernels.fp8_quant`` to read back; ``qk_rms_norm_`` normalizes each
query and key head of a q/k/v projection in place (Qwen3's per-head norms), one launch
for both where ``rms_norm`` would need each strided view copied first."""

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
from kernels.fp8 import FP8_DTYPE
from kernels.fp8_quant import row_scale, to_e4m3


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                     stride_x, stride_res, stride_out, stride_res_out,
                     hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     USE_GDC: tl.constexpr = False, scale_ptr=None, inv_max=1.0,
                     min_scale=0.0, QUANT: tl.constexpr = False):
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
    if QUANT:  # out is e4m3: quantize the normed row as stored in x's dtype (= w's)
        y = (normed * w).to(x.dtype).to(tl.float32)
        scale = row_scale(tl.max(tl.abs(y), axis=0), inv_max, min_scale)
        tl.store(out_ptr + row * stride_out + cols, to_e4m3(y, scale, out_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(scale_ptr + row, scale)
    else:
        tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _qk_rms_norm_kernel(x_ptr, q_w_ptr, k_w_ptr, stride_t, stride_h, num_heads, num_q_heads,
                        head_dim, eps, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                        USE_GDC: tl.constexpr = False):
    if USE_GDC:  # launched early: wait for the projection that writes x
        gdc_launch_dependents()
        gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    mask = (heads < num_heads)[:, None] & dim_ok[None, :]
    ptrs = x_ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / head_dim + eps)
    normed = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    w_q = tl.load(q_w_ptr + dims, mask=dim_ok, other=0.0).to(tl.float32)
    w_k = tl.load(k_w_ptr + dims, mask=dim_ok, other=0.0).to(tl.float32)
    w = tl.where((heads < num_q_heads)[:, None], w_q[None, :], w_k[None, :])
    tl.store(ptrs, (normed * w).to(x.dtype), mask=mask)


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
    x2, res2 = _check_args(x, weight, residual)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype),
                      device=x.device)
    res_out = _launch(x2, res2, weight, eps, out.view(-1, x.shape[-1]))
    return out if res_out is None else (out, res_out.view(x.shape))


def rms_norm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None, inv_max: float, min_scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(q, scale, x + residual)``: ``rms_norm`` followed by
    ``kernels.fp8_quant.per_token_quant_fp8`` of the normed rows, in one launch (each row
    quantized as ``rms_norm`` stores it, in ``x``'s dtype). Compiled, this kernel gives
    each thread 16 consecutive elements (the e4m3 store's 16 bytes), ``rms_norm`` 16 bytes
    of its output, so the sum of squares adds in another order and a row's inverse root
    may differ in its last bit: a few values per million one e4m3 step apart (H200).

    Args:
        x: ``[..., hidden]`` activations, contiguous in the last dim.
        weight: ``[hidden]``, of ``x``'s dtype.
        residual: optional, shaped like ``x``; the third output is None without it.
        inv_max, min_scale: as ``per_token_quant_fp8`` takes them.
    Returns:
        ``q`` float8_e4m3fn shaped like ``x``, ``scale`` ``[rows, 1]`` float32.
    Raises:
        ValueError: a tensor that is not as described (named).
    """
    x2, res2 = _check_args(x, weight, residual)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype} to quantize the normed rows, "
                         f"got {weight.dtype}.")
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device)
    res_out = _launch(x2, res2, weight, eps, q.view(-1, x.shape[-1]),
                      (scale, float(inv_max), float(min_scale)))
    return q, scale, None if res_out is None else res_out.view(x.shape)


def qk_rms_norm_(qk: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 eps: float, num_q_heads: int) -> torch.Tensor:
    """``rms_norm`` of every head of ``qk [T, heads, head_dim]`` in place: the first
    ``num_q_heads`` heads with ``q_weight``, the rest with ``k_weight`` (the query and key
    heads of a q/k/v projection, read and written through its strides: no copy).

    Args:
        qk: ``[T, heads, head_dim]``, head dim contiguous, of the weights' dtype.
        q_weight, k_weight: ``[head_dim]``.
        eps: added to each head's mean square.
        num_q_heads: how many leading heads are query heads (0 to ``heads``).
    Returns:
        ``qk``, normalized.
    Raises:
        ValueError: an argument that is not as described (named).
    """
    check_tensor("qk", qk, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    num_tokens, num_heads, head_dim = qk.shape
    for name, weight in (("q_weight", q_weight), ("k_weight", k_weight)):
        check_tensor(name, weight, ndim=1, dtypes=(qk.dtype,), device=qk.device,
                     contiguous=True)
        check_shape(name, weight, (head_dim,))
    if not 0 <= num_q_heads <= num_heads:
        raise ValueError(f"num_q_heads must be in [0, {num_heads}], got {num_q_heads}.")
    if num_tokens == 0 or num_heads == 0 or head_dim == 0:
        return qk
    block_d = next_power_of_2(head_dim)
    block_h = min(next_power_of_2(num_heads), max(1, 2048 // block_d))
    _qk_rms_norm_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        qk, q_weight, k_weight, qk.stride(0), qk.stride(1), num_heads, num_q_heads,
        head_dim, float(eps), BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=max(1, min(4, block_h * block_d // 512)),
        **launch_dependent_args(qk.device))
    return qk


def _check_args(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` and ``residual`` as ``[rows, hidden]`` views, after checking all three."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() < 1:
        raise ValueError("x must have at least one dim.")
    hidden = x.shape[-1]
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device,
                 contiguous=True)
    check_shape("weight", weight, (hidden,))
    res2 = None
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device,
                     last_dim_contiguous=True)
        check_shape("residual", residual, tuple(x.shape))
        res2 = residual.reshape(-1, hidden)
    return x.reshape(-1, hidden), res2


def _launch(x2: torch.Tensor, res2: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out2: torch.Tensor, quant: tuple[torch.Tensor, float, float] | None = None
            ) -> torch.Tensor | None:
    """One program per row of ``x2`` into ``out2`` (with ``quant``: e4m3 rows, their scales
    into ``quant[0]``); returns the new ``x + residual`` rows, or None without a residual."""
    num_rows, hidden = x2.shape
    res_out2 = (torch.empty((num_rows, hidden), dtype=x2.dtype, device=x2.device)
                if res2 is not None else None)
    if num_rows == 0:
        return res_out2
    block = next_power_of_2(hidden)
    num_warps = max(1, min(16, block // 512))
    quant_args = {}
    if quant is not None:
        scale, inv_max, min_scale = quant
        quant_args = dict(scale_ptr=scale, inv_max=inv_max, min_scale=min_scale, QUANT=True)
    _rms_norm_kernel[(num_rows,)](
        x2, res2 if res2 is not None else x2, weight, out2,
        res_out2 if res_out2 is not None else out2,
        x2.stride(0), res2.stride(0) if res2 is not None else 0, out2.stride(0),
        res_out2.stride(0) if res_out2 is not None else 0, hidden, float(eps),
        HAS_RESIDUAL=res2 is not None, BLOCK=block, num_warps=num_warps,
        **quant_args, **launch_dependent_args(x2.device))
    return res_out2
