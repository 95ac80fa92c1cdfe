import pytest
import torch

from kernels import torch_ref
from kernels.rotary_kv_cache_write import rotary_kv_cache_write
from tests.kernels.conftest import DEVICE, GPU_DTYPES, SMALL_DTYPES, assert_close, needs_gpu
from tests.kernels.test_rotary import _cos_sin_cache


def _check(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, rot_dim: int,
           is_neox: bool, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
    # q, k, v are strided views of one fused qkv tensor, as a model produces them.
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device=device).to(dtype)
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    k_before = k.clone()
    cache = _cos_sin_cache(rot_dim, 4096, device)
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    num_blocks = -(-num_tokens // block_size) + 2
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[1::3] = -1  # padding tokens: no cache write (their query is still rotated)
    # NaN-filled caches: untouched slots must stay NaN, written ones must match.
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    value_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    exp_kc, exp_vc = key_cache.clone(), value_cache.clone()
    exp_q, exp_k = torch_ref.rotary_embedding(positions, q.clone(), k.clone(), cache, is_neox)
    torch_ref.write_kv_cache(exp_k, v, exp_kc, exp_vc, slots)
    rotary_kv_cache_write(positions, q, k, v, key_cache, value_cache, slots.to(torch.int32),
                          cache, is_neox)
    assert_close(q, exp_q, "query", dtype)
    assert_close(key_cache, exp_kc, "key_cache", dtype, equal_nan=True)
    assert_close(value_cache, exp_vc, "value_cache", dtype, equal_nan=True)
    assert int(torch.isnan(key_cache.float()).sum()) == int(torch.isnan(exp_kc.float()).sum())
    assert torch.equal(k, k_before), "the key tensor was modified"


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim,rot_dim,block_size", [
    (1, 1, 1, 16, 16, 16), (7, 4, 2, 32, 32, 4), (5, 3, 1, 64, 32, 8), (9, 6, 3, 24, 16, 4)])
def test_rotary_kv_cache_write_matches_reference(num_tokens, num_heads, num_kv_heads,
                                                 head_dim, rot_dim, block_size, is_neox,
                                                 dtype):
    _check(num_tokens, num_heads, num_kv_heads, head_dim, rot_dim, is_neox, block_size,
           dtype, DEVICE)


def test_rotary_kv_cache_write_rejects_bad_arguments():
    q = torch.randn(3, 2, 16, device=DEVICE)
    k = torch.randn(3, 1, 16, device=DEVICE)
    kv_cache = torch.zeros(2, 4, 1, 16, device=DEVICE)
    pos = torch.arange(3, device=DEVICE)
    cache = torch.randn(10, 16, device=DEVICE)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary_kv_cache_write(pos, q, k, k, kv_cache, kv_cache.clone(), pos,
                              torch.randn(10, 18, device=DEVICE))
    with pytest.raises(ValueError, match="positions"):
        rotary_kv_cache_write(pos[:2], q, k, k, kv_cache, kv_cache.clone(), pos, cache)
    with pytest.raises(ValueError, match="query"):
        rotary_kv_cache_write(pos, q.half(), k, k, kv_cache, kv_cache.clone(), pos, cache)
    with pytest.raises(ValueError, match="slot_mapping"):
        rotary_kv_cache_write(pos, q, k, k, kv_cache, kv_cache.clone(), pos.float(), cache)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("num_tokens,rot_dim", [(1, 128), (4099, 128), (777, 64)])
def test_rotary_kv_cache_write_gpu(num_tokens, rot_dim, is_neox, dtype):
    _check(num_tokens, 32, 8, 128, rot_dim, is_neox, 16, dtype, torch.device("cuda"))
