"""KV-cache write (vLLM's reshape_and_cache): store each new token's K/V at its slot.

An FP8 cache (``float8_e4m3fn`` or ``float8_e5m2``) stores ``clamp(k / k_scale)`` and
``clamp(v / v_scale)``; the attention kernels multiply the scales back in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_scale,
    check_tensor,
    next_power_of_2,
)
from kernels.fp8 import FP8_KV_DTYPES, is_fp8

# Element types a KV cache may have: the activations' or FP8.
KV_CACHE_DTYPES = FLOAT_DTYPES + FP8_KV_DTYPES


@triton.jit
def _round_to_fp8(y, MIN_EXPONENT: tl.constexpr, MANTISSA_BITS: tl.constexpr):
    """``y`` (float32, within the format's range) rounded to the nearest value of an FP8
    format whose smallest normal exponent is ``MIN_EXPONENT`` (e4m3 -6, e5m2 -14) and
    which keeps ``MANTISSA_BITS`` (3, 2), ties to even, still in float32: adding and
    subtracting ``1.5 * 2^23 * ulp`` rounds to a multiple of the format's ulp at ``y``
    (subnormals included). The cast that follows is then exact, so every backend agrees
    with torch (Triton's interpreter truncates instead of carrying a rounded-up mantissa
    into the exponent)."""
    exponent = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp_exponent = tl.maximum(exponent, MIN_EXPONENT) - MANTISSA_BITS
    magic = (((ulp_exponent + 150) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    return (y + magic) - magic


@triton.jit
def _round_to_e4m3(y):
    """``y`` (float32, ``|y| <= 448``) rounded to the nearest e4m3 value, in float32."""
    return _round_to_fp8(y, -6, 3)


@triton.jit
def store_cache(ptr, x, inv_scale, mask, IS_FP8: tl.constexpr):
    """Store ``x`` at ``ptr`` in the cache's element type; an FP8 cache gets
    ``clamp(x * inv_scale)`` (a plain cast would not saturate everywhere)."""
    if IS_FP8:
        y = x.to(tl.float32) * inv_scale
        if ptr.dtype.element_ty == tl.float8e5:
            # +-57344: e5m2's largest finite value.
            y = _round_to_fp8(tl.minimum(tl.maximum(y, -57344.0), 57344.0), -14, 2)
        else:
            # +-448: e4m3's largest finite value (kernels.fp8.FP8_MAX).
            y = _round_to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
        tl.store(ptr, y.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_cache_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                           stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_cb, stride_ct, stride_ch,
                           num_heads, head_dim, block_size, k_inv_scale, v_inv_scale,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                           IS_FP8: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    blk = slot // block_size
    off = slot % block_size
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < head_dim)
    heads = heads.to(tl.int64)
    cache_off = blk * stride_cb + off * stride_ct + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(k_ptr + tok * stride_kt + heads[:, None] * stride_kh + dims[None, :],
                mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + heads[:, None] * stride_vh + dims[None, :],
                mask=mask)
    store_cache(kc_ptr + cache_off, k, k_inv_scale, mask, IS_FP8)
    store_cache(vc_ptr + cache_off, v, v_inv_scale, mask, IS_FP8)


def check_kv_write_args(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                        value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Raise ValueError naming the argument unless the KV write's arguments agree."""
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor("value", value, ndim=3, dtypes=(key.dtype,), device=key.device,
                 last_dim_contiguous=True)
    check_tensor("key_cache", key_cache, ndim=4, dtypes=KV_CACHE_DTYPES, device=key.device,
                 last_dim_contiguous=True)
    check_tensor("value_cache", value_cache, ndim=4, dtypes=(key_cache.dtype,),
                 device=key.device, last_dim_contiguous=True)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES,
                 device=key.device)
    num_tokens, num_heads, head_dim = key.shape
    if tuple(value.shape) != tuple(key.shape):
        raise ValueError(f"value must have shape {tuple(key.shape)}, "
                         f"got {tuple(value.shape)}.")
    if tuple(key_cache.shape[2:]) != (num_heads, head_dim):
        raise ValueError(f"key_cache must be [num_blocks, block_size, {num_heads}, "
                         f"{head_dim}], got {tuple(key_cache.shape)}.")
    if value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError("value_cache must have key_cache's shape and strides.")
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping must have {num_tokens} entries, "
                         f"got {slot_mapping.shape[0]}.")


def inverse_scales(key_cache: torch.Tensor, k_scale: float, v_scale: float
                   ) -> tuple[float, float, bool]:
    """``(1 / k_scale, 1 / v_scale, is_fp8)`` kernel arguments (ValueError on a bad scale)."""
    check_scale("k_scale", k_scale)
    check_scale("v_scale", v_scale)
    return 1.0 / k_scale, 1.0 / v_scale, is_fp8(key_cache.dtype)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Drop-in for ``torch_ref.write_kv_cache`` (in place; slot -1 is skipped).

    Args:
        key, value: ``[T, Hkv, D]``, last dim contiguous (views of qkv are fine).
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]``, same strides,
            last dim contiguous.
        slot_mapping: ``[T]`` int32/int64, ``block_id * block_size + offset`` or -1.
        k_scale, v_scale: an FP8 cache stores ``k / k_scale``, ``v / v_scale`` (saturated);
            ignored by other caches.
    """
    check_kv_write_args(key, value, key_cache, value_cache, slot_mapping)
    k_inv, v_inv, is_fp8 = inverse_scales(key_cache, k_scale, v_scale)
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    block_d = next_power_of_2(head_dim)
    # About 4K elements per program: enough bytes in flight, few idle lanes.
    block_h = min(next_power_of_2(num_heads), max(1, 4096 // block_d))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _kv_cache_write_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        num_heads, head_dim, key_cache.shape[1], k_inv, v_inv,
        BLOCK_H=block_h, BLOCK_D=block_d, IS_FP8=is_fp8, num_warps=4)
