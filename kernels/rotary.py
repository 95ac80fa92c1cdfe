"""Rotary position embedding (NeoX and GPT-J styles), applied IN PLACE to query and key.

The cos/sin cache carries any RoPE scaling (``llama3``, linear, ...): the kernel only
rotates by the cached angles, so scaling lives where the cache is built.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, next_power_of_2


@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, tok, num_heads, cos, sin,
                  half, IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < half)
    base = x_ptr + tok * stride_t + heads[:, None].to(tl.int64) * stride_h
    if IS_NEOX:
        off1 = dims[None, :]
        off2 = dims[None, :] + half
    else:
        off1 = 2 * dims[None, :]
        off2 = 2 * dims[None, :] + 1
    x1 = tl.load(base + off1, mask=mask, other=0.0)
    x2 = tl.load(base + off2, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(base + off1, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(base + off2, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   num_q_heads, num_k_heads, half,
                   IS_NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BLOCK_HALF: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < half
    cos = tl.load(cache_ptr + pos * stride_cache + dims, mask=dmask, other=1.0)
    sin = tl.load(cache_ptr + pos * stride_cache + half + dims, mask=dmask, other=0.0)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]
    _rotate_heads(q_ptr, stride_qt, stride_qh, tok, num_q_heads, cos, sin, half,
                  IS_NEOX, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, stride_kt, stride_kh, tok, num_k_heads, cos, sin, half,
                  IS_NEOX, BLOCK_HK, BLOCK_HALF)


def check_rotary_shapes(positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        num_tokens: int, head_dim: int) -> None:
    """ValueError unless ``positions`` has one entry per token and ``cos_sin_cache``'s
    rotary dim is even and at most ``head_dim``."""
    rot_dim = cos_sin_cache.shape[1]
    if positions.shape[0] != num_tokens:
        raise ValueError(f"positions must have {num_tokens} entries, "
                         f"got {positions.shape[0]}.")
    if rot_dim % 2 or rot_dim > head_dim:
        raise ValueError(f"cos_sin_cache must have an even last dim <= head_dim "
                         f"{head_dim}, got {rot_dim}.")


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox_style: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``torch_ref.rotary_embedding``, except that it rotates IN PLACE.

    Args:
        positions: ``[T]`` int32/int64 positions into the cache.
        query: ``[T, H, D]``; key: ``[T, Hkv, D]``; same dtype, last dim contiguous
            (views of a fused qkv output are fine).
        cos_sin_cache: ``[max_positions, rot_dim]`` = ``cat(cos, sin)``, contiguous rows.
        is_neox_style: rotate halves (NeoX/Llama) or interleaved pairs (GPT-J).
    Returns:
        ``(query, key)``, the same tensors, rotated in their first ``rot_dim`` dims.
    """
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES, device=positions.device,
                 last_dim_contiguous=True)
    check_tensor("key", key, ndim=3, dtypes=(query.dtype,), device=positions.device,
                 last_dim_contiguous=True)
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=FLOAT_DTYPES,
                 device=positions.device, last_dim_contiguous=True)
    num_tokens, num_q_heads, head_dim = query.shape
    rot_dim = cos_sin_cache.shape[1]
    if key.shape[0] != num_tokens or key.shape[2] != head_dim:
        raise ValueError(f"key must be [{num_tokens}, Hkv, {head_dim}], "
                         f"got {tuple(key.shape)}.")
    check_rotary_shapes(positions, cos_sin_cache, num_tokens, head_dim)
    if num_tokens == 0:
        return query, key
    half = rot_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, query, key, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        cos_sin_cache.stride(0), num_q_heads, key.shape[1], half,
        IS_NEOX=bool(is_neox_style), BLOCK_HQ=next_power_of_2(num_q_heads),
        BLOCK_HK=next_power_of_2(key.shape[1]), BLOCK_HALF=next_power_of_2(half),
        num_warps=4)
    return query, key
