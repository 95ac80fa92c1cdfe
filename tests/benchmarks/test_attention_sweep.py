"""The read-only floor of ``benchmarks/attention_sweep.py`` reads what a decode split reads."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.attention_sweep import paged_read

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("num_splits,block_n", [(1, 16), (3, 16), (4, 32)])
def test_paged_read_sums_each_splits_keys(num_splits, block_n):
    torch.manual_seed(0)
    block_size, num_kv_heads, head_dim = 16, 2, 16
    key_cache = torch.randn(12, block_size, num_kv_heads, head_dim, device=DEVICE)
    value_cache = torch.randn_like(key_cache)
    tables = torch.randperm(12, device=DEVICE).view(2, 6).to(torch.int32)
    seq_lens = torch.tensor([90, 33], dtype=torch.int32, device=DEVICE)
    got = paged_read(key_cache, value_cache, tables, seq_lens, num_splits, block_n)
    for req, seq_len in enumerate(seq_lens.tolist()):
        per_split = math.ceil(math.ceil(seq_len / num_splits) / block_n) * block_n
        pos = torch.arange(seq_len, device=DEVICE)
        rows = tables[req, pos // block_size].long() * block_size + pos % block_size
        keys = key_cache.flatten(0, 1)[rows] + value_cache.flatten(0, 1)[rows]
        for split in range(num_splits):
            part = keys[split * per_split:(split + 1) * per_split].sum(dim=(0, 2))
            torch.testing.assert_close(got[req, :, split], part, atol=1e-4, rtol=1e-4)
