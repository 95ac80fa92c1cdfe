"""Per-layer attention windows read from HF configs, and logit soft-capping in the backends."""

from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

from worker_svc.layers.attention import AttentionMetadata
from worker_svc.layers.torch_attention import TorchAttentionBackend
from worker_svc.models.attention_pattern import layer_sliding_windows

SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.mark.parametrize("config, want", [
    # Gemma 2: local and global layers alternate, local first.
    (Gemma2Config(num_hidden_layers=4, sliding_window=8, **SMALL), [8, None, 8, None]),
    # Gemma 3: one global layer in every sliding_window_pattern.
    (Gemma3TextConfig(num_hidden_layers=7, sliding_window=5, **SMALL),
     [5, 5, 5, 5, 5, None, 5]),
    (Gemma3TextConfig(num_hidden_layers=4, sliding_window=5, sliding_window_pattern=2, **SMALL),
     [5, None, 5, None]),
    # Qwen2: the window is off unless use_sliding_window; then from max_window_layers on.
    (Qwen2Config(num_hidden_layers=3, sliding_window=6, use_sliding_window=False, **SMALL),
     [None, None, None]),
    (Qwen2Config(num_hidden_layers=3, sliding_window=6, use_sliding_window=True,
                 max_window_layers=1, **SMALL), [None, 6, 6]),
    # Mistral: the window on every layer, or none.
    (MistralConfig(num_hidden_layers=2, sliding_window=12, **SMALL), [12, 12]),
    (MistralConfig(num_hidden_layers=2, sliding_window=None, **SMALL), [None, None]),
])
def test_windows_from_transformers_configs(config, want):
    assert layer_sliding_windows(config) == want


@pytest.mark.parametrize("fields, want", [
    # Configs that transformers did not normalise (no layer_types): the raw fields decide.
    (dict(sliding_window=4, use_sliding_window=True, max_window_layers=2), [None, None, 4]),
    (dict(sliding_window=4, use_sliding_window=False, max_window_layers=0), [None] * 3),
    (dict(sliding_window=4, sliding_window_pattern=3), [4, 4, None]),
    (dict(sliding_window=4), [4, 4, 4]),
    (dict(sliding_window=None), [None] * 3),
    (dict(sliding_window=4, layer_types=["full_attention", "sliding_attention",
                                         "full_attention"]), [None, 4, None]),
])
def test_windows_from_raw_config_fields(fields, want):
    assert layer_sliding_windows(SimpleNamespace(num_hidden_layers=3, **fields)) == want


@pytest.mark.parametrize("fields, message", [
    (dict(sliding_window=4, layer_types=["sliding_attention"]), "layer_types has 1 entries"),
    (dict(sliding_window=4, layer_types=["sliding_attention", "chunked_attention"]),
     "layer_types must hold only"),
    (dict(sliding_window=0), "sliding_window must be a positive integer"),
])
def test_bad_patterns_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        layer_sliding_windows(SimpleNamespace(num_hidden_layers=2, **fields))


def _softcap_reference(q, k_cache, v_cache, tables, seq_lens, starts, scale, window, cap):
    # Independent of the backend: a loop over requests in float64.
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, seq_len in enumerate(seq_lens):
        blocks = tables[i][:-(-seq_len // block_size)]
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].double()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].double()
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        rows = q[starts[i]:starts[i + 1]].double()
        for j in range(rows.shape[0]):
            pos = seq_len - rows.shape[0] + j
            scores = torch.einsum("hd,khd->hk", rows[j], k) * scale
            scores = cap * torch.tanh(scores / cap)
            visible = torch.tensor([p <= pos and (window is None or pos - p < window)
                                    for p in range(seq_len)])
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            out[starts[i] + j] = torch.einsum("hk,khd->hd", probs, v)
    return out.float()


@pytest.mark.parametrize("window", [None, 5])
def test_torch_backend_soft_caps_scores(window):
    gen = torch.Generator().manual_seed(3)
    block_size, num_heads, num_kv_heads, head_dim = 4, 4, 2, 16
    # (new tokens, cached tokens before them): decodes, a prefill, a chunk after cached ones.
    layout = [(1, 9), (11, 0), (1, 3), (4, 8)]
    k_cache = torch.randn(30, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(30, block_size, num_kv_heads, head_dim, generator=gen)
    perm = torch.randperm(30, generator=gen).tolist()
    tables, slots, starts, seq_lens = [], [], [0], []
    for n, cached in layout:
        table = [perm.pop() for _ in range(-(-(n + cached) // block_size))]
        tables.append(table + [0] * (4 - len(table)))
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(cached, cached + n)]
        starts.append(starts[-1] + n)
        seq_lens.append(n + cached)
    meta = AttentionMetadata(torch.tensor(slots), torch.tensor(starts, dtype=torch.int32),
                             torch.tensor(seq_lens, dtype=torch.int32),
                             torch.tensor(tables, dtype=torch.int32), 11, max(seq_lens))
    # Large scores, so that a cap of 2 changes the softmax a lot.
    q = 3 * torch.randn(starts[-1], num_heads, head_dim, generator=gen)
    k = torch.randn(starts[-1], num_kv_heads, head_dim, generator=gen)
    v = torch.randn(starts[-1], num_kv_heads, head_dim, generator=gen)
    backend = TorchAttentionBackend()
    got = backend.forward(q, k, v, k_cache, v_cache, meta, 0.5, window, logit_softcap=2.0)
    want = _softcap_reference(q, k_cache, v_cache, tables, seq_lens, starts, 0.5, window, 2.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    uncapped = backend.forward(q, k, v, k_cache, v_cache, meta, 0.5, window)
    assert (uncapped - want).abs().max() > 0.1  # the cap matters at these scores
