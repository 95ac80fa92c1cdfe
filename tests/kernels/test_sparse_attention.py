"""Sparse patterns in the attention kernels: the strided pattern against the dense masked
reference (``torch_ref.paged_attention``), and proof that decode skips what it cannot see."""

import pytest
import torch

from kernels import torch_ref
from kernels.paged_decode_attention import paged_decode_attention
from kernels.prefill_attention import prefill_attention
from tests.kernels.conftest import (
    DEVICE,
    GPU_DTYPES,
    SMALL_DTYPES,
    assert_close,
    make_paged_kv,
    needs_gpu,
)


def _decode(seq_lens, stride, dtype, device, num_heads=4, num_kv_heads=2, head_dim=32,
            block_size=16, num_splits=None, poison=False):
    key_cache, value_cache, tables, seq = make_paged_kv(seq_lens, num_kv_heads, head_dim,
                                                        block_size, dtype, device)
    query = torch.randn(len(seq_lens), num_heads, head_dim, device=device).to(dtype)
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    expected = torch_ref.paged_attention(query, key_cache, value_cache, tables, seq, qsl,
                                         scale, attention_stride=stride)
    if poison:
        # Every key the pattern hides becomes NaN: a kernel that loads it (even to mask
        # it) returns NaN, since 0 * NaN is NaN in p @ v.
        for i, n in enumerate(seq_lens):
            q = n - 1
            hidden = [p for p in range(n) if not (q - p < stride or (q - p) % stride == 0)]
            for p in hidden:
                block = tables[i, p // block_size]
                key_cache[block, p % block_size] = float("nan")
                value_cache[block, p % block_size] = float("nan")
    out = paged_decode_attention(query, key_cache, value_cache, tables, seq, qsl, scale,
                                 num_splits=num_splits, attention_stride=stride)
    assert_close(out, expected, "strided decode attention", dtype)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("stride", [1, 5, 16])
def test_strided_decode_matches_the_masked_reference(stride, num_splits, dtype):
    _decode([1, 5, 17, 50, 71], stride, dtype, DEVICE, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_strided_decode_never_reads_hidden_keys(num_splits):
    _decode([23, 70, 96], 7, torch.float32, DEVICE, num_splits=num_splits, poison=True)


def _prefill(seq_lens, query_lens, stride, dtype, device, num_heads=4, num_kv_heads=2,
             head_dim=32, block_size=16):
    key_cache, value_cache, tables, seq = make_paged_kv(seq_lens, num_kv_heads, head_dim,
                                                        block_size, dtype, device)
    query = torch.randn(sum(query_lens), num_heads, head_dim, device=device).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32,
                       device=device)
    scale = head_dim ** -0.5
    out = prefill_attention(query, key_cache, value_cache, tables, seq, qsl, scale,
                            attention_stride=stride)
    expected = torch_ref.paged_attention(query, key_cache, value_cache, tables, seq, qsl,
                                         scale, attention_stride=stride)
    assert_close(out, expected, "strided prefill attention", dtype)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("stride", [1, 6, 40])
def test_strided_prefill_and_chunks_match_the_masked_reference(stride, dtype):
    # Whole prompts, a chunk after a cached prefix, and a decode row in one batch.
    _prefill([45, 90, 9], [45, 30, 1], stride, dtype, DEVICE)


def test_the_strided_pattern_changes_the_output_and_rejects_a_window_beside_it():
    key_cache, value_cache, tables, seq = make_paged_kv([40], 2, 32, 16, torch.float32, DEVICE)
    query = torch.randn(1, 4, 32, device=DEVICE)
    qsl = torch.arange(2, dtype=torch.int32, device=DEVICE)
    dense = paged_decode_attention(query, key_cache, value_cache, tables, seq, qsl, 0.2)
    strided = paged_decode_attention(query, key_cache, value_cache, tables, seq, qsl, 0.2,
                                     attention_stride=8)
    assert not torch.allclose(dense, strided)
    with pytest.raises(ValueError, match="attention_stride"):
        paged_decode_attention(query, key_cache, value_cache, tables, seq, qsl, 0.2,
                               sliding_window=8, attention_stride=8)
    with pytest.raises(ValueError, match="attention_stride"):
        prefill_attention(query, key_cache, value_cache, tables, seq, qsl, 0.2,
                          attention_stride=0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_strided_gpu(dtype):
    cuda = torch.device("cuda")
    lens = torch.randint(1, 5000, (7,)).tolist()
    _decode(lens, 256, dtype, cuda, num_heads=32, num_kv_heads=8, head_dim=128)
    _prefill([3000, 700, 1], [1000, 700, 1], 256, dtype, cuda, num_heads=32, num_kv_heads=8,
             head_dim=128)
