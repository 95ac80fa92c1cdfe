"""Pointwise ops and decode-sized linear products of the model layers: Triton kernels on
CUDA, torch references elsewhere.

``attention_backend="torch"`` on CUDA switches these to the references too, so a whole
model can be compared kernel-free on the same card.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kernels import torch_ref

_use_triton = True
# Linear layers whose input has at most this many rows run the GEMV kernel (kernels/gemv.py)
# on CUDA; more rows, or 0 here, run cuBLAS. 1: batch-1 decode (on an H200 the kernel beats
# cuBLAS at one row and loses from two). GRIDLLM_GEMV_MAX_ROWS sets it at start.
GEMV_MAX_ROWS = 1


def set_use_triton(enabled: bool) -> None:
    global _use_triton
    _use_triton = enabled


def _triton(x: torch.Tensor) -> bool:
    return _use_triton and x.is_cuda


def uses_triton(x: torch.Tensor) -> bool:
    """Whether the pointwise ops run their Triton kernels on ``x`` (CUDA, and not switched
    to the torch references)."""
    return _triton(x)


def set_gemv_max_rows(rows: int) -> None:
    """Rows up to which linear layers use the GEMV kernel on CUDA (0: never)."""
    from kernels.gemv import MAX_ROWS

    global GEMV_MAX_ROWS
    if not 0 <= rows <= MAX_ROWS:
        raise ValueError(f"rows must be in [0, {MAX_ROWS}], got {rows}.")
    GEMV_MAX_ROWS = rows


def _gemv_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """The rows of ``x`` when the GEMV kernel takes ``x @ weight^T``, else 0."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 0 < rows <= GEMV_MAX_ROWS and _triton(x) and weight.dtype == x.dtype:
        return rows
    return 0


def _rows_from_environment() -> None:
    raw = os.environ.get("GRIDLLM_GEMV_MAX_ROWS")
    if raw is None:
        return
    try:
        rows = int(raw)
    except ValueError:
        raise ValueError(f"GRIDLLM_GEMV_MAX_ROWS must be an integer, got {raw!r}.") from None
    try:
        set_gemv_max_rows(rows)
    except ValueError as exc:
        raise ValueError(f"GRIDLLM_GEMV_MAX_ROWS: {exc}") from None


_rows_from_environment()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear``; a few rows of a floating weight on CUDA go through the GEMV kernel,
    which reads the weight near copy bandwidth where cuBLAS's tile kernels do not."""
    rows = _gemv_rows(x, weight)
    if rows:
        from kernels.gemv import gemv

        out = gemv(x.reshape(rows, x.shape[-1]).contiguous(), weight, bias)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu_and_mul(linear(x, weight, bias))`` for a merged ``[gate | up]`` weight: the
    gated MLP's gate/up projection and activation, one GEMV launch where ``linear`` would
    use the GEMV kernel (the down projection then reads a finished input)."""
    rows = _gemv_rows(x, weight)
    if rows:
        from kernels.gemv import gemv

        out = gemv(x.reshape(rows, x.shape[-1]).contiguous(), weight, bias, silu_out=True)
        return out.reshape(*x.shape[:-1], weight.shape[0] // 2)
    return silu_and_mul(linear(x, weight, bias))


def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm, linear,
                        silu_out: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(linear(rms_norm(x + residual)), x + residual)`` in one GEMV launch for a decode
    row over 16-bit weights; for a layer with ``forward_rms_norm`` (FP8 layers) what that
    returns (the norm kernel writing the e4m3 rows where the layer quantizes its input);
    None elsewhere (the caller runs the norm, then the layer).

    e4m3 weights take the norm kernel and then the unfused GEMV: each fused program takes
    the row's norm itself, which held the e4m3 GEMV at 53-65% of copy bandwidth where the
    unfused one reads at 73-85% (H200, docs/performance.md); the 16-bit GEMV reads at copy
    bandwidth either way and saves the launch.

    Args:
        norm: an RMSNorm (``weight``, ``eps``; ``x * rstd * weight``).
        linear: a column-parallel linear layer (``weight``, ``bias``).
        silu_out: ``linear`` is the merged ``[gate | up]`` projection and the result is
            ``silu_and_mul`` of it (``ops.linear_silu_and_mul``).
    """
    forward_rms_norm = getattr(linear, "forward_rms_norm", None)
    if forward_rms_norm is not None:
        return forward_rms_norm(x, residual, norm, silu_out=silu_out)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    # An FP8 layer's e4m3 weight never has x's dtype.
    if not (rows == 1 <= GEMV_MAX_ROWS and _triton(x) and norm.weight.dtype == x.dtype
            and linear.weight.dtype == x.dtype):
        return None
    from kernels.gemv import rms_norm_gemv

    y, res = rms_norm_gemv(x.reshape(1, -1), residual.reshape(1, -1), norm.weight, norm.eps,
                           linear.weight, linear.bias, silu_out=silu_out)
    return y.reshape(*x.shape[:-1], -1), res.reshape(x.shape)


def scatter_sampled(input_ids: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
                    sampled: torch.Tensor) -> None:
    """``input_ids[dst] = sampled[src]`` in place: the tokens the last step sampled, still
    on the device, as this step's inputs (one launch on CUDA, three torch ops else)."""
    if _triton(input_ids):
        from kernels.step_inputs import scatter_sampled as kernel

        kernel(input_ids, dst, src, sampled)
    else:
        torch_ref.scatter_sampled(input_ids, dst, src, sampled)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    if _triton(x):
        from kernels.rms_norm import rms_norm as kernel

        return kernel(x, weight, eps, residual)
    return torch_ref.rms_norm(x, weight, eps, residual)


def qk_rms_norm_(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                 k_weight: torch.Tensor, eps: float) -> bool:
    """RMSNorm of each head of a q/k/v projection's ``[T, heads, head_dim]`` query and key
    views in place (Qwen3's per-head norms), where one kernel can: on CUDA, k's heads
    following q's in one buffer, the weights of the views' dtype. Returns whether it did
    (else the caller runs its norms): one launch for both views, and no copy of either
    (``rms_norm`` would first copy each strided view into rows)."""
    if not (_triton(q) and q.dtype == k.dtype == q_weight.dtype == k_weight.dtype
            and q.dim() == k.dim() == 3 and q.shape[0] == k.shape[0]
            and q.shape[2] == k.shape[2] and q.stride() == k.stride() and q.stride(2) == 1
            and q.stride(1) == q.shape[2]
            and k.data_ptr() == q.data_ptr() + q.shape[1] * q.stride(1) * q.element_size()):
        return False
    from kernels.rms_norm import qk_rms_norm_ as kernel

    qk = q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())
    kernel(qk, q_weight, k_weight, eps, q.shape[1])
    return True


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _triton(x):
        from kernels.silu_and_mul import silu_and_mul as kernel

        return kernel(x)
    return torch_ref.silu_and_mul(x)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox_style: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    if _triton(query):
        from kernels.rotary import rotary_embedding as kernel

        kernel(positions, query, key, cos_sin_cache, is_neox_style)  # in place
        return query, key
    return torch_ref.rotary_embedding(positions, query, key, cos_sin_cache, is_neox_style)
