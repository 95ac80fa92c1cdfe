import pytest
import torch

from kernels import torch_ref
from kernels.kv_cache_write import write_kv_cache
from tests.kernels.conftest import DEVICE, GPU_DTYPES, SMALL_DTYPES, assert_close, needs_gpu


def _check(num_tokens: int, num_kv_heads: int, head_dim: int, block_size: int,
           num_blocks: int, dtype: torch.dtype, device: torch.device) -> None:
    # key/value are strided views of a fused kv tensor.
    kv = torch.randn(num_tokens, 2, num_kv_heads, head_dim, device=device).to(dtype)
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[::3] = -1  # padding tokens are skipped
    # NaN-filled caches: untouched slots must stay NaN, written ones must match.
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    value_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    exp_k, exp_v = key_cache.clone(), value_cache.clone()
    torch_ref.write_kv_cache(key, value, exp_k, exp_v, slots)
    write_kv_cache(key, value, key_cache, value_cache, slots.to(torch.int32))
    assert_close(key_cache, exp_k, "key_cache", dtype, equal_nan=True)
    assert_close(value_cache, exp_v, "value_cache", dtype, equal_nan=True)
    assert int(torch.isnan(key_cache.float()).sum()) == int(torch.isnan(exp_k.float()).sum())


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("num_tokens,num_kv_heads,head_dim,block_size,num_blocks", [
    (1, 1, 16, 16, 2), (17, 2, 32, 16, 3), (33, 3, 24, 8, 6)])
def test_kv_cache_write_matches_reference(num_tokens, num_kv_heads, head_dim, block_size,
                                          num_blocks, dtype):
    _check(num_tokens, num_kv_heads, head_dim, block_size, num_blocks, dtype, DEVICE)


def test_kv_cache_write_rejects_bad_arguments():
    key = torch.randn(4, 2, 16, device=DEVICE)
    cache = torch.zeros(2, 16, 2, 16, device=DEVICE)
    slots = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(key, key, cache, cache.clone(), slots.float())
    with pytest.raises(ValueError, match="key_cache"):
        write_kv_cache(key, key, cache[:, :, :1].contiguous(), cache.clone(), slots)
    with pytest.raises(ValueError, match="value"):
        write_kv_cache(key, key[:3], cache, cache.clone(), slots)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 8191])
def test_kv_cache_write_gpu(num_tokens, dtype):
    _check(num_tokens, 8, 128, 16, 1024, dtype, torch.device("cuda"))
