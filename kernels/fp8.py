"""FP8 (float8 e4m3) storage: the dtype, its range, saturating quantization with a scale.

A quantized tensor ``q`` with scale ``s`` stands for ``q * s``; quantizing divides by ``s``
(multiplies by ``1 / s``, the same rounding in the kernels and the references) and clamps
to the finite range, because a cast past +-448 makes NaN in torch (e4m3fn has no inf).
Torch only (the CPU backend imports it); the kernels' store is ``kv_cache_write.store_cache``.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def quantize_fp8(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``x / scale`` (as ``x * (1 / scale)`` in float32), clamped, rounded to e4m3."""
    inv = 1.0 / scale if not isinstance(scale, torch.Tensor) else scale.float().reciprocal()
    return (x.float() * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(q: torch.Tensor, scale: float | torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` in float32, then cast to ``dtype``."""
    return (q.float() * scale).to(dtype)
