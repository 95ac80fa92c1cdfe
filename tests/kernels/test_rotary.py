import pytest
import torch

from kernels import torch_ref
from kernels.rotary import rotary_embedding
from tests.kernels.conftest import DEVICE, GPU_DTYPES, SMALL_DTYPES, assert_close, needs_gpu


def _cos_sin_cache(rot_dim: int, max_pos: int, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


def _check(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, rot_dim: int,
           is_neox: bool, dtype: torch.dtype, device: torch.device) -> None:
    # q and k are strided views of one fused qkv tensor, as a model produces them.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim,
                      device=device).to(dtype)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    cache = _cos_sin_cache(rot_dim, 4096, device)
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    exp_q, exp_k = torch_ref.rotary_embedding(positions, q.clone(), k.clone(), cache, is_neox)
    out_q, out_k = rotary_embedding(positions, q, k, cache, is_neox)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert_close(q, exp_q, "query", dtype)
    assert_close(k, exp_k, "key", dtype)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before), \
        "rotary wrote outside query/key"


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim,rot_dim", [
    (1, 1, 1, 16, 16), (7, 4, 2, 32, 32), (5, 3, 1, 64, 32)])
def test_rotary_matches_reference(num_tokens, num_heads, num_kv_heads, head_dim, rot_dim,
                                  is_neox, dtype):
    _check(num_tokens, num_heads, num_kv_heads, head_dim, rot_dim, is_neox, dtype, DEVICE)


def test_rotary_rejects_bad_arguments():
    q = torch.randn(3, 2, 16, device=DEVICE)
    k = torch.randn(3, 1, 16, device=DEVICE)
    pos = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary_embedding(pos, q, k, torch.randn(10, 18, device=DEVICE))
    with pytest.raises(ValueError, match="positions"):
        rotary_embedding(pos[:2], q, k, torch.randn(10, 16, device=DEVICE))
    with pytest.raises(ValueError, match="key"):
        rotary_embedding(pos, q, k.half(), torch.randn(10, 16, device=DEVICE))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("num_tokens,rot_dim", [(1, 128), (4099, 128), (777, 64)])
def test_rotary_gpu(num_tokens, rot_dim, is_neox, dtype):
    _check(num_tokens, 32, 8, 128, rot_dim, is_neox, dtype, torch.device("cuda"))
