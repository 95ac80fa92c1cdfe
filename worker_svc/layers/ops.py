"""Pointwise ops of the model layers: Triton kernels on CUDA, torch references elsewhere.

``attention_backend="torch"`` on CUDA switches these to the references too, so a whole
model can be compared kernel-free on the same card.
"""

from __future__ import annotations

import torch

from kernels import torch_ref

_use_triton = True


def set_use_triton(enabled: bool) -> None:
    global _use_triton
    _use_triton = enabled


def _triton(x: torch.Tensor) -> bool:
    return _use_triton and x.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    if _triton(x):
        from kernels.rms_norm import rms_norm as kernel

        return kernel(x, weight, eps, residual)
    return torch_ref.rms_norm(x, weight, eps, residual)


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
