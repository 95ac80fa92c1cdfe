"""The CPU attention backend (SDPA over paged KV) against the torch reference op."""

import pytest
import torch

from kernels import torch_ref
from worker_svc.layers.attention import AttentionMetadata
from worker_svc.layers.torch_attention import TorchAttentionBackend


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_torch_backend_matches_reference(num_heads, num_kv_heads, sliding_window):
    gen = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    block_size, head_dim, num_blocks = 4, 16, 40
    # (new tokens, cached tokens before them): decodes, a prefill, a chunk after a prefix hit.
    layout = [(1, 6), (9, 0), (1, 16), (5, 7), (1, 0), (3, 13)]
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, cu, seq_lens = [], [], [0], []
    for n, cached in layout:
        total = n + cached
        table = [perm.pop() for _ in range(-(-total // block_size))]
        tables.append(table + [0] * (6 - len(table)))
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(cached, total)]
        cu.append(cu[-1] + n)
        seq_lens.append(total)
    num_tokens = cu[-1]
    meta = AttentionMetadata(torch.tensor(slots), torch.tensor(cu, dtype=torch.int32),
                             torch.tensor(seq_lens, dtype=torch.int32),
                             torch.tensor(tables, dtype=torch.int32),
                             max(n for n, _ in layout), max(seq_lens))
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    torch_ref.write_kv_cache(k, v, ref_k, ref_v, meta.slot_mapping)
    want = torch_ref.paged_attention(q, ref_k, ref_v, meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, 0.25, sliding_window)
    got = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 0.25, sliding_window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
