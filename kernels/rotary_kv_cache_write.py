"""Rotary embedding fused with the KV-cache write: one launch per layer instead of two.

Each program takes one token: it rotates the token's query heads in place and writes its
key heads, rotated, and its value heads into the cache slot. The key tensor itself is left
as it was (attention reads keys from the cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import (
    EARLY_READS,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_tensor,
    gdc_launch_dependents,
    gdc_wait,
    launch_dependent_args,
    next_power_of_2,
)
from kernels.kv_cache_write import check_kv_write_args, inverse_scales, store_cache
from kernels.rotary import check_rotary_shapes


@triton.jit
def _rotary_kv_cache_write_kernel(
        pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, cache_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_cb, stride_ct, stride_ch, stride_cos,
        num_q_heads, num_kv_heads, head_dim, half, block_size, k_inv_scale, v_inv_scale,
        IS_FP8: tl.constexpr, IS_NEOX: tl.constexpr, HAS_PASS: tl.constexpr, BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
        USE_GDC: tl.constexpr = False, EARLY: tl.constexpr = False):
    if USE_GDC:  # launched early: wait for the kernel that writes q, k, v
        gdc_launch_dependents()
        if not EARLY:
            gdc_wait()
    # The step's inputs (positions, slots) and the cos/sin table: none written by a kernel
    # of the step, so with EARLY they are read before the wait.
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < half
    cos = tl.load(cache_ptr + pos * stride_cos + dims, mask=dmask, other=1.0)
    sin = tl.load(cache_ptr + pos * stride_cos + half + dims, mask=dmask, other=0.0)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]
    if IS_NEOX:
        off1 = dims[None, :]
        off2 = dims[None, :] + half
    else:
        off1 = 2 * dims[None, :]
        off2 = 2 * dims[None, :] + 1
    if USE_GDC and EARLY:
        gdc_wait()

    # Query: rotated in place.
    q_heads = tl.arange(0, BLOCK_HQ)
    q_mask = (q_heads[:, None] < num_q_heads) & dmask[None, :]
    q_base = q_ptr + tok * stride_qt + q_heads[:, None].to(tl.int64) * stride_qh
    x1 = tl.load(q_base + off1, mask=q_mask, other=0.0)
    x2 = tl.load(q_base + off2, mask=q_mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(q_base + off1, (x1f * cos - x2f * sin).to(x1.dtype), mask=q_mask)
    tl.store(q_base + off2, (x2f * cos + x1f * sin).to(x1.dtype), mask=q_mask)

    if slot < 0:
        return
    kv_heads = tl.arange(0, BLOCK_HK)
    kv_heads64 = kv_heads[:, None].to(tl.int64)
    cache_base = (slot // block_size) * stride_cb + (slot % block_size) * stride_ct \
        + kv_heads64 * stride_ch
    # Key: rotated into the cache, rounded to the key's dtype as the reference does.
    k_mask = (kv_heads[:, None] < num_kv_heads) & dmask[None, :]
    k_base = k_ptr + tok * stride_kt + kv_heads64 * stride_kh
    y1 = tl.load(k_base + off1, mask=k_mask, other=0.0)
    y2 = tl.load(k_base + off2, mask=k_mask, other=0.0)
    y1f = y1.to(tl.float32)
    y2f = y2.to(tl.float32)
    r1 = (y1f * cos - y2f * sin).to(y1.dtype)
    r2 = (y2f * cos + y1f * sin).to(y1.dtype)
    store_cache(kc_ptr + cache_base + off1, r1, k_inv_scale, k_mask, IS_FP8)
    store_cache(kc_ptr + cache_base + off2, r2, k_inv_scale, k_mask, IS_FP8)
    all_dims = tl.arange(0, BLOCK_D)[None, :]
    full_mask = (kv_heads[:, None] < num_kv_heads) & (all_dims < head_dim)
    if HAS_PASS:
        # Dims past the rotated ones are copied as they are.
        pass_mask = full_mask & (all_dims >= 2 * half)
        kp = tl.load(k_base + all_dims, mask=pass_mask, other=0.0)
        store_cache(kc_ptr + cache_base + all_dims, kp, k_inv_scale, pass_mask, IS_FP8)
    v = tl.load(v_ptr + tok * stride_vt + kv_heads64 * stride_vh + all_dims, mask=full_mask)
    store_cache(vc_ptr + cache_base + all_dims, v, v_inv_scale, full_mask, IS_FP8)


def rotary_kv_cache_write(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          cos_sin_cache: torch.Tensor, is_neox_style: bool = True,
                          k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """``torch_ref.rotary_embedding`` then ``torch_ref.write_kv_cache``, in one launch.

    Rotates ``query`` IN PLACE and stores the rotated keys and the values at their slots
    (slot -1 is skipped); ``key`` is not modified.

    Args:
        positions: ``[T]`` int32/int64 positions into ``cos_sin_cache``.
        query: ``[T, H, D]``; key, value: ``[T, Hkv, D]``; one dtype, last dim contiguous
            (views of a fused qkv output are fine).
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]``, same strides.
        slot_mapping: ``[T]`` int32/int64 ``block_id * block_size + offset`` or -1.
        cos_sin_cache: ``[max_positions, rot_dim]`` = ``cat(cos, sin)``.
        is_neox_style: rotate halves (NeoX/Llama) or interleaved pairs (GPT-J).
        k_scale, v_scale: an FP8 cache stores ``k / k_scale``, ``v / v_scale`` (saturated).
    """
    check_kv_write_args(key, value, key_cache, value_cache, slot_mapping)
    k_inv, v_inv, is_fp8 = inverse_scales(key_cache, k_scale, v_scale)
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=key.device)
    check_tensor("query", query, ndim=3, dtypes=(key.dtype,), device=key.device,
                 last_dim_contiguous=True)
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=FLOAT_DTYPES,
                 device=key.device, last_dim_contiguous=True)
    num_tokens, num_kv_heads, head_dim = key.shape
    rot_dim = cos_sin_cache.shape[1]
    if query.shape[0] != num_tokens or query.shape[2] != head_dim:
        raise ValueError(f"query must be [{num_tokens}, H, {head_dim}], "
                         f"got {tuple(query.shape)}.")
    check_rotary_shapes(positions, cos_sin_cache, num_tokens, head_dim)
    if num_tokens == 0:
        return
    half = rot_dim // 2
    _rotary_kv_cache_write_kernel[(num_tokens,)](
        positions, slot_mapping, query, key, value, key_cache, value_cache, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        cos_sin_cache.stride(0), query.shape[1], num_kv_heads, head_dim, half,
        key_cache.shape[1], k_inv, v_inv, IS_FP8=is_fp8, IS_NEOX=bool(is_neox_style),
        HAS_PASS=rot_dim < head_dim,
        BLOCK_HQ=next_power_of_2(query.shape[1]), BLOCK_HK=next_power_of_2(num_kv_heads),
        BLOCK_HALF=next_power_of_2(half), BLOCK_D=next_power_of_2(head_dim), num_warps=4,
        EARLY=EARLY_READS, **launch_dependent_args(query.device))
