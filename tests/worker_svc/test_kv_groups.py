"""KV groups on the worker: how layers map onto groups and cache tensors, and that a
local layer never reads the blocks before its window (a freed block reused by another
request holds someone else's keys there)."""

import pytest
import torch

from worker_svc.kv_groups import kv_groups_of
from worker_svc.layers.attention import AttentionMetadata
from worker_svc.layers.torch_attention import TorchAttentionBackend
from worker_svc.layers.triton_attention import TritonAttentionBackend


def test_one_pattern_is_one_group_laid_out_as_before():
    for windows in ([None] * 4, [12] * 4):
        groups = kv_groups_of(windows)
        assert groups.windows == (windows[0],) and groups.limits_windows == ()
        assert groups.layer_slots == (0, 1, 2, 3) and groups.num_slots == 4


def test_interleaved_layers_form_equal_groups_global_first():
    # Gemma 2: local, global, local, global ...
    groups = kv_groups_of([4096, None] * 3)
    assert groups.windows == (None, 4096) and groups.limits_windows == (0, 4096)
    assert groups.layer_groups == (1, 0, 1, 0, 1, 0)
    assert groups.layer_slots == (0, 0, 1, 1, 2, 2) and groups.num_slots == 3
    # Gemma 3's five local layers per global one (two globals in 12): five local groups.
    groups = kv_groups_of(([512] * 5 + [None]) * 2)
    assert groups.windows == (None,) + (512,) * 5 and groups.num_slots == 2
    # An uneven split pads the last group: 3 local layers in groups of 2.
    groups = kv_groups_of([8, 8, None, 8, None])
    assert groups.windows == (None, 8, 8) and groups.layer_groups == (1, 1, 0, 2, 0)
    assert groups.layer_slots == (0, 1, 0, 0, 1)


@pytest.mark.parametrize("backend_cls", [TorchAttentionBackend, TritonAttentionBackend])
@pytest.mark.parametrize("num_query", [1, 5])
def test_blocks_before_the_window_are_never_read(backend_cls, num_query):
    """The same attention with the blocks wholly before the window replaced by a block of
    another request's (huge) keys and values gives the same output."""
    torch.manual_seed(0)
    bs, heads, kv_heads, dim, window, seq_len = 4, 4, 2, 16, 6, 23
    num_blocks = 16
    kc = torch.randn(num_blocks, bs, kv_heads, dim)
    vc = torch.randn(num_blocks, bs, kv_heads, dim)
    table = torch.arange(1, 1 + -(-seq_len // bs), dtype=torch.int32)
    # Block 0: someone else's KV, large enough to dominate any softmax it entered.
    kc[0], vc[0] = 1e3, 1e3
    first_visible = (seq_len - num_query - window + 1) // bs
    assert first_visible >= 2
    freed = table.clone()
    freed[:first_visible] = 0
    query = torch.randn(num_query, heads, dim)
    outputs = []
    for tables in (table, freed):
        metadata = AttentionMetadata(
            slot_mapping=torch.full((num_query,), -1, dtype=torch.long),
            query_start_loc=torch.tensor([0, num_query], dtype=torch.int32),
            seq_lens=torch.tensor([seq_len], dtype=torch.int32), block_tables=tables[None],
            max_query_len=num_query, max_seq_len=seq_len)
        backend = backend_cls()
        outputs.append(backend._attend(query.clone(), kc, vc, metadata, dim ** -0.5, window)
                       if backend_cls is TritonAttentionBackend else
                       backend.forward(query.clone(), torch.zeros(num_query, kv_heads, dim),
                                       torch.zeros(num_query, kv_heads, dim), kc, vc,
                                       metadata, dim ** -0.5, window))
    assert torch.isfinite(outputs[1]).all()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)
