"""FP8 storage: the dtypes, their ranges, saturating quantization with a scale.

Weights and activations are float8 e4m3 (``FP8_DTYPE``); a KV cache is e4m3 or e5m2
(``FP8_KV_DTYPES``: e5m2 keeps two more exponent bits and one fewer mantissa bit, a range
of +-57344 and a coarser rounding). A quantized tensor ``q`` with scale ``s`` stands for
``q * s``; quantizing divides by ``s`` (multiplies by ``1 / s``, the same rounding in the
kernels and the references) and clamps to the finite range, because a cast past it makes
NaN (e4m3fn has no inf) or inf (e5m2). Torch only (the CPU backend imports it); the
kernels' store is ``kv_cache_write.store_cache``.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# The element types of an FP8 KV cache (vLLM's "fp8"/"fp8_e4m3", and "fp8_e5m2").
FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is one of ``FP8_KV_DTYPES``."""
    return dtype in FP8_KV_DTYPES


def quantize_fp8(x: torch.Tensor, scale: float | torch.Tensor,
                 dtype: torch.dtype = FP8_DTYPE) -> torch.Tensor:
    """``x / scale`` (as ``x * (1 / scale)`` in float32), clamped to ``dtype``'s finite
    range, rounded to ``dtype`` (e4m3 or e5m2)."""
    inv = 1.0 / scale if not isinstance(scale, torch.Tensor) else scale.float().reciprocal()
    limit = float(torch.finfo(dtype).max)
    return (x.float() * inv).clamp(-limit, limit).to(dtype)


def dequantize_fp8(q: torch.Tensor, scale: float | torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` in float32, then cast to ``dtype``."""
    return (q.float() * scale).to(dtype)
