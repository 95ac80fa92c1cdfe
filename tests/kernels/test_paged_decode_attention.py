import pytest
import torch

from kernels import torch_ref
from kernels.fp8 import FP8_DTYPE, quantize_fp8
from kernels.paged_decode_attention import (
    paged_decode_attention,
    pick_num_splits,
    rotary_paged_decode_attention,
)
from tests.kernels.conftest import (
    DEVICE,
    GPU_DTYPES,
    SMALL_DTYPES,
    assert_close,
    make_paged_kv,
    needs_gpu,
    poisoned_allocations,
)
from tests.kernels.test_rotary import _cos_sin_cache


def _check(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
           block_size: int, dtype: torch.dtype, device: torch.device,
           sliding_window: int | None = None, num_splits: int | None = None,
           logit_softcap: float | None = None) -> None:
    key_cache, value_cache, block_tables, seq = make_paged_kv(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, device)
    query = torch.randn(len(seq_lens), num_heads, head_dim, device=device).to(dtype)
    if logit_softcap is not None:
        query = query * 8  # scores well past the cap, so capping changes them
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    with poisoned_allocations():
        out = paged_decode_attention(query, key_cache, value_cache, block_tables, seq, qsl,
                                     scale, sliding_window, num_splits=num_splits,
                                     logit_softcap=logit_softcap)
    expected = torch_ref.paged_attention(query, key_cache, value_cache, block_tables, seq,
                                         qsl, scale, sliding_window, logit_softcap)
    assert_close(out, expected, "decode attention", dtype)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_decode_matches_reference(num_heads, num_kv_heads, dtype):
    _check([1, 15, 17, 33], num_heads, num_kv_heads, 32, 16, dtype, DEVICE)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("sliding_window", [None, 10])
def test_decode_split_kv_and_window(num_splits, sliding_window):
    _check([1, 17, 50], 4, 2, 32, 16, torch.float32, DEVICE, sliding_window, num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_logit_softcap(num_splits):
    _check([1, 17, 50], 4, 2, 32, 16, torch.float32, DEVICE, 10, num_splits, logit_softcap=5.0)


def test_softcap_changes_the_output():
    """The cap is applied: without it the same inputs give another output."""
    key_cache, value_cache, block_tables, seq = make_paged_kv(
        [40], 2, 32, 16, torch.float32, DEVICE)
    query = torch.randn(1, 4, 32, device=DEVICE) * 8
    qsl = torch.arange(2, dtype=torch.int32, device=DEVICE)
    capped = paged_decode_attention(query, key_cache, value_cache, block_tables, seq, qsl,
                                    32 ** -0.5, logit_softcap=2.0)
    plain = paged_decode_attention(query, key_cache, value_cache, block_tables, seq, qsl,
                                   32 ** -0.5)
    assert not torch.allclose(capped, plain, atol=1e-3)
    with pytest.raises(ValueError, match="logit_softcap"):
        paged_decode_attention(query, key_cache, value_cache, block_tables, seq, qsl, 1.0,
                               logit_softcap=0.0)


def test_decode_odd_head_dim_and_block_size():
    _check([9, 40], 2, 1, 48, 8, torch.float32, DEVICE, num_splits=2)


def test_decode_padding_row_gives_zeros():
    key_cache, value_cache, block_tables, seq = make_paged_kv(
        [5, 0], 1, 16, 16, torch.float32, DEVICE)
    query = torch.randn(2, 2, 16, device=DEVICE)
    for splits in (1, 2):
        out = paged_decode_attention(query, key_cache, value_cache, block_tables, seq, None,
                                     0.25, num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out).all()


def test_short_context_bound_skips_the_reduce_pass(monkeypatch):
    import kernels.paged_decode_attention as module

    launches = []
    reduce_kernel = module._paged_decode_reduce_kernel

    class Recorder:
        def __getitem__(self, grid):
            launches.append(grid)
            return reduce_kernel[grid]

    monkeypatch.setattr(module, "_paged_decode_reduce_kernel", Recorder())
    monkeypatch.setattr(module, "num_sms", lambda device: 64)
    # A block table as wide as a long context, but every sequence is short.
    key_cache, value_cache, block_tables, seq = make_paged_kv(
        [5, 20], 2, 32, 16, torch.float32, DEVICE)
    wide = torch.zeros(2, 128, dtype=block_tables.dtype, device=DEVICE)
    wide[:, :block_tables.shape[1]] = block_tables
    query = torch.randn(2, 4, 32, device=DEVICE)
    expected = torch_ref.paged_attention(query, key_cache, value_cache, wide, seq,
                                         torch.arange(3, device=DEVICE), 0.2)
    out = paged_decode_attention(query, key_cache, value_cache, wide, seq, None, 0.2)
    assert launches, "a wide table without a bound splits the context"
    assert_close(out, expected, "decode attention (split)")
    launches.clear()
    out = paged_decode_attention(query, key_cache, value_cache, wide, seq, None, 0.2,
                                 max_seq_len=20)
    assert not launches
    assert_close(out, expected, "decode attention (one split)")


def test_pick_num_splits_fills_small_batches():
    dev = torch.device("cpu")
    assert pick_num_splits(256, 8, 8192, dev) == 1
    assert pick_num_splits(1, 1, 8192, dev) > 1
    assert pick_num_splits(1, 1, 100, dev) == 1


def test_decode_rejects_bad_arguments():
    key_cache, value_cache, block_tables, seq = make_paged_kv([5], 2, 16, 16,
                                                              torch.float32, DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(torch.randn(1, 3, 16, device=DEVICE), key_cache, value_cache,
                               block_tables, seq, None, 1.0)
    with pytest.raises(ValueError, match="query"):
        paged_decode_attention(torch.randn(2, 2, 16, device=DEVICE), key_cache, value_cache,
                               block_tables, seq, None, 1.0)
    with pytest.raises(ValueError, match="value_cache"):
        paged_decode_attention(torch.randn(1, 2, 16, device=DEVICE), key_cache,
                               value_cache.half(), block_tables, seq, None, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(torch.randn(1, 2, 16, device=DEVICE), key_cache, value_cache,
                               block_tables.float(), seq, None, 1.0)


def _check_rotary(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                  rot_dim: int, is_neox: bool, block_size: int, dtype: torch.dtype,
                  device: torch.device, sliding_window: int | None = None,
                  attention_stride: int | None = None, logit_softcap: float | None = None,
                  num_splits: int | None = None, fp8_scales: tuple[float, float] | None = None
                  ) -> None:
    """The fused kernel against the torch chain: rotate q and k, write k and v at the new
    token's slot (the last of each context; a padding row has seq_len 0 and slot -1),
    attend. The new slots hold NaN before, so reading one instead of the new key fails."""
    key_cache, value_cache, block_tables, seq = make_paged_kv(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, device)
    k_scale, v_scale = fp8_scales or (1.0, 1.0)
    slots = torch.tensor([int(block_tables[i, (n - 1) // block_size]) * block_size
                          + (n - 1) % block_size if n else -1 for i, n in enumerate(seq_lens)],
                         device=device)
    flat = (key_cache.view(-1, num_kv_heads, head_dim), value_cache.view(-1, num_kv_heads,
                                                                          head_dim))
    for cache in flat:
        cache[slots[slots >= 0]] = float("nan")
    if fp8_scales is not None:
        key_cache = quantize_fp8(key_cache.float() * k_scale, k_scale)
        value_cache = quantize_fp8(value_cache.float() * v_scale, v_scale)
    # q, k, v are views of one fused qkv tensor, as a model produces them.
    num_reqs, q_size, kv_size = len(seq_lens), num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_reqs, q_size + 2 * kv_size, device=device).to(dtype)
    query = qkv[:, :q_size].view(num_reqs, num_heads, head_dim)
    key = qkv[:, q_size:q_size + kv_size].view(num_reqs, num_kv_heads, head_dim)
    value = qkv[:, q_size + kv_size:].view(num_reqs, num_kv_heads, head_dim)
    if logit_softcap is not None:
        query.mul_(8)  # scores well past the cap
    positions = (seq.long() - 1).clamp(min=0)
    cos_sin = _cos_sin_cache(rot_dim, max(seq_lens + [64]), device)  # every position
    exp_q, exp_k = torch_ref.rotary_embedding(positions, query, key, cos_sin, is_neox)
    exp_kc, exp_vc = key_cache.clone(), value_cache.clone()
    torch_ref.write_kv_cache(exp_k, value, exp_kc, exp_vc, slots, k_scale, v_scale)
    qkv_before = qkv.clone()
    scale = head_dim ** -0.5
    with poisoned_allocations():
        out = rotary_paged_decode_attention(
            positions.to(torch.int32), query, key, value, key_cache, value_cache,
            slots.to(torch.int32), cos_sin, is_neox, block_tables, seq, scale,
            sliding_window, num_splits, logit_softcap=logit_softcap,
            attention_stride=attention_stride, k_scale=k_scale, v_scale=v_scale)
    qsl = torch.arange(num_reqs + 1, dtype=torch.int32, device=device)
    expected = torch_ref.paged_attention(exp_q, exp_kc, exp_vc, block_tables, seq, qsl, scale,
                                         sliding_window, logit_softcap, attention_stride,
                                         k_scale, v_scale)
    assert_close(out, expected, "decode attention with the new token", dtype)
    assert torch.equal(qkv, qkv_before), "query, key or value was modified"
    # The caches: only the new slots changed, to the rotated key and the value (an FP8
    # value within a unit of e4m3 rounding: the rotation may round one ulp apart).
    fp8 = fp8_scales is not None
    for name, actual, exp in (("key_cache", key_cache, exp_kc),
                              ("value_cache", value_cache, exp_vc)):
        assert_close(actual.float(), exp.float(), name, torch.float32 if fp8 else dtype,
                     scale=4e3 if fp8 else 1.0, equal_nan=True)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("is_neox,rot_dim", [(True, 32), (False, 16)])
def test_rotary_decode_matches_the_torch_chain(is_neox, rot_dim, dtype):
    # 33 keys in one split: the new key is in the third tile of the interpreter's 16.
    _check_rotary([1, 15, 0, 17, 33], 4, 2, 32, rot_dim, is_neox, 16, dtype, DEVICE,
                  num_splits=1)


@pytest.mark.parametrize("pattern", [
    dict(num_splits=3), dict(sliding_window=10, num_splits=2),
    dict(attention_stride=4, num_splits=2), dict(logit_softcap=5.0, num_splits=3)])
def test_rotary_decode_splits_and_patterns(pattern):
    _check_rotary([1, 17, 50], 4, 1, 32, 32, True, 8, torch.float32, DEVICE, **pattern)


def test_rotary_decode_fp8_cache():
    _check_rotary([3, 0, 40], 4, 2, 32, 32, True, 16, torch.float32, DEVICE, num_splits=2,
                  fp8_scales=(0.5, 0.25))


def test_rotary_decode_rejects_bad_arguments():
    key_cache, value_cache, block_tables, seq = make_paged_kv([5], 2, 16, 16,
                                                              torch.float32, DEVICE)
    query, key = torch.randn(1, 4, 16, device=DEVICE), torch.randn(1, 2, 16, device=DEVICE)
    pos = torch.tensor([4], device=DEVICE)
    slots = torch.tensor([int(block_tables[0, 0]) * 16 + 4], device=DEVICE)
    cos_sin = _cos_sin_cache(16, 64, DEVICE)

    def call(**kw):
        args = dict(positions=pos, query=query, key=key, value=key, key_cache=key_cache,
                    value_cache=value_cache, slot_mapping=slots, cos_sin_cache=cos_sin,
                    is_neox_style=True, block_tables=block_tables, seq_lens=seq, scale=0.25)
        return rotary_paged_decode_attention(**{**args, **kw})

    call()
    with pytest.raises(ValueError, match="positions"):
        call(positions=torch.tensor([1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="slot_mapping"):
        call(slot_mapping=slots.float())
    with pytest.raises(ValueError, match="cos_sin_cache"):
        call(cos_sin_cache=_cos_sin_cache(18, 64, DEVICE)[:, :17])
    with pytest.raises(ValueError, match="key"):
        call(key=key.half(), value=key.half())
    with pytest.raises(ValueError, match="key must have 1 rows"):
        call(key=torch.randn(2, 2, 16, device=DEVICE), value=torch.randn(2, 2, 16,
                                                                         device=DEVICE),
             slot_mapping=slots.repeat(2))
    with pytest.raises(ValueError, match="k_scale"):
        call(k_scale=0.0)
    assert key_cache.dtype != FP8_DTYPE


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("batch,max_len,sliding_window,logit_softcap", [
    (1, 8191, None, None), (64, 2049, None, None), (7, 5000, 1024, None),
    (7, 5000, 1024, 50.0)])
def test_decode_gpu(batch, max_len, sliding_window, logit_softcap, dtype):
    seq_lens = torch.randint(1, max_len + 1, (batch,)).tolist()
    seq_lens[0] = max_len
    _check(seq_lens, 32, 8, 128, 16, dtype, torch.device("cuda"), sliding_window,
           logit_softcap=logit_softcap)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("batch,max_len,fp8", [(1, 300, False), (1, 8191, False),
                                               (9, 2049, False), (4, 1000, True)])
def test_rotary_decode_gpu(batch, max_len, fp8, dtype):
    seq_lens = torch.randint(1, max_len + 1, (batch,)).tolist()
    seq_lens[0] = max_len
    _check_rotary(seq_lens, 32, 8, 128, 128, True, 16, dtype, torch.device("cuda"),
                  fp8_scales=(0.5, 0.25) if fp8 else None)
