"""TritonAttentionBackend against the torch backend (lives here for the interpreter switch)."""

import dataclasses

import pytest
import torch

from kernels import torch_ref
from tests.kernels.conftest import DEVICE, assert_close
from tests.kernels.test_rotary import _cos_sin_cache
from worker_svc.layers.attention import AttentionMetadata
from worker_svc.layers.selector import get_attention_backend
from worker_svc.layers.torch_attention import TorchAttentionBackend


def _metadata(seq_lens, query_lens, block_size, max_blocks, device):
    tables, slots, next_block = [], [], 0
    for seq_len, q_len in zip(seq_lens, query_lens, strict=True):
        nb = (seq_len + block_size - 1) // block_size
        row = list(range(next_block, next_block + nb)) + [0] * (max_blocks - nb)
        next_block += nb
        tables.append(row)
        for pos in range(seq_len - q_len, seq_len):
            slots.append(row[pos // block_size] * block_size + pos % block_size)
    slots.append(-1)  # a padding token
    qsl = torch.tensor([0] + list(query_lens)).cumsum(0).to(torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens)), next_block


def _step(num_tokens, num_blocks, block_size, num_heads=4, num_kv_heads=2, head_dim=32):
    """Random queries, keys and values of a step, and random caches with their copies
    for the reference backend."""
    query = torch.randn(num_tokens, num_heads, head_dim, device=DEVICE)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE)
    cache_shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, device=DEVICE)
    value_cache = torch.randn(cache_shape, device=DEVICE)
    return query, key, value, key_cache, value_cache, (key_cache.clone(), value_cache.clone())


def _forward_both(meta, num_blocks, block_size, sliding_window=None):
    """Both backends over one step of ``meta`` (its last slot a padding token): outputs,
    the Triton backend's caches, the reference's."""
    query, key, value, key_cache, value_cache, ref_caches = _step(
        meta.slot_mapping.shape[0], num_blocks, block_size)
    backend = get_attention_backend("triton", DEVICE)
    out = backend.forward(query[:-1], key, value, key_cache, value_cache, meta, 0.2,
                          sliding_window)
    expected = TorchAttentionBackend().forward(query[:-1], key, value, *ref_caches, meta, 0.2,
                                               sliding_window)
    return out, expected, (key_cache, value_cache), ref_caches


@pytest.mark.parametrize("sliding_window", [None, 8])
@pytest.mark.parametrize("query_lens", [[1, 1, 1], [5, 1, 17]])
def test_triton_backend_matches_torch_backend(query_lens, sliding_window):
    seq_lens, block_size = [20, 3, 33], 16
    meta, num_blocks = _metadata(seq_lens, query_lens, block_size, 4, DEVICE)
    out, expected, (key_cache, value_cache), ref_caches = _forward_both(
        meta, num_blocks, block_size, sliding_window)
    assert_close(key_cache, ref_caches[0], "key_cache")
    assert_close(value_cache, ref_caches[1], "value_cache")
    assert_close(out, expected, "attention output")


@pytest.mark.parametrize("num_one_token", [None, 0, 2])
def test_one_query_requests_split_off_where_the_step_has_them(monkeypatch, num_one_token):
    """With ``SPLIT_ONE_TOKEN`` on, a step's one-query requests go to the decode kernel
    (its rows kept in the step's ``kernel_cache``) unless the host says it has none; the
    output is the torch backend's either way."""
    import kernels.prefill_attention as pa

    monkeypatch.setattr(pa, "SPLIT_ONE_TOKEN", True)
    seq_lens, query_lens, block_size = [20, 3, 33, 9], [1, 3, 17, 1], 16
    meta, num_blocks = _metadata(seq_lens, query_lens, block_size, 4, DEVICE)
    meta = dataclasses.replace(meta, slot_mapping=meta.slot_mapping[:-1],
                               num_one_token=num_one_token)
    query, key, value, key_cache, value_cache, ref_caches = _step(
        meta.slot_mapping.shape[0], num_blocks, block_size)
    backend = get_attention_backend("triton", DEVICE)
    out = backend.forward(query, key, value, key_cache, value_cache, meta, 0.2)
    expected = TorchAttentionBackend().forward(query, key, value, *ref_caches, meta, 0.2)
    assert_close(out, expected, "attention output")
    assert ("one_token_requests" in meta.kernel_cache) == (num_one_token != 0)


@pytest.mark.parametrize("query_lens", [[1, 1, 3, 17], [1, 1, 1, 2], [1, 5, 1, 17]])
@pytest.mark.parametrize("sliding_window", [None, 8])
def test_one_query_requests_first_are_attended_in_place(monkeypatch, query_lens,
                                                        sliding_window):
    """Where the host knows the one-query requests come first (``one_token_prefix``, as
    ``InputBatch.prepare`` sets it), the decode kernel reads and writes their rows in place,
    without the gather path's rows in ``kernel_cache``; the output is the torch backend's.
    A layout whose one-query requests are not all first keeps the gather."""
    import kernels.prefill_attention as pa

    monkeypatch.setattr(pa, "SPLIT_ONE_TOKEN", True)
    seq_lens, block_size = [20, 3, 33, 9], 16
    prefix = 2 if query_lens[:2] == [1, 1] and 1 not in query_lens[2:] else 0
    meta, num_blocks = _metadata(seq_lens, query_lens, block_size, 4, DEVICE)
    meta = dataclasses.replace(meta, num_one_token=query_lens.count(1),
                               one_token_prefix=prefix)
    out, expected, _, _ = _forward_both(meta, num_blocks, block_size, sliding_window)
    assert_close(out, expected, "attention output")
    assert ("one_token_requests" in meta.kernel_cache) == (prefix == 0)


def test_one_token_prefix_out_of_range_is_refused():
    from kernels.prefill_attention import prefill_attention

    meta, num_blocks = _metadata([20, 3], [2, 1], 16, 4, DEVICE)
    query, _, _, key_cache, value_cache, _ = _step(3, num_blocks, 16)
    with pytest.raises(ValueError, match="one_token_prefix"):
        prefill_attention(query, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                          meta.query_start_loc, 0.2, split_one_token=True,
                          one_token_prefix=3)


class _Rotary:
    """The reference rotation with a RotaryEmbedding's attributes."""

    def __init__(self, cos_sin_cache, is_neox_style):
        self.cos_sin_cache, self.is_neox_style = cos_sin_cache, is_neox_style

    def __call__(self, positions, query, key):
        return torch_ref.rotary_embedding(positions, query, key, self.cos_sin_cache,
                                          self.is_neox_style)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("query_lens,padded", [([1, 1, 1], False), ([1, 1, 1], True),
                                               ([5, 1, 17], True)])
def test_fused_rotary_path_matches_torch_backend(query_lens, padded, is_neox):
    """Decode rows alone (the decode kernel), with a padding token or with longer queries
    (the general kernel), after the rotary + KV-write kernel."""
    seq_lens, block_size = [20, 3, 33], 16
    meta, num_blocks = _metadata(seq_lens, query_lens, block_size, 4, DEVICE)
    if not padded:
        meta = dataclasses.replace(meta, slot_mapping=meta.slot_mapping[:-1])
    positions = torch.cat([torch.arange(s - q, s) for s, q in zip(seq_lens, query_lens,
                                                                   strict=True)]
                          + [torch.tensor([0])] * padded).to(DEVICE)  # the padding token's
    rotary = _Rotary(_cos_sin_cache(24, 64, DEVICE), is_neox)  # 24 of 32 dims rotate
    query, key, value, key_cache, value_cache, ref_caches = _step(
        positions.shape[0], num_blocks, block_size)
    expected = TorchAttentionBackend().forward_rotary(
        positions, rotary, query.clone(), key.clone(), value, *ref_caches, meta, 0.2)
    out = get_attention_backend("triton", DEVICE).forward_rotary(
        positions, rotary, query, key, value, key_cache, value_cache, meta, 0.2)
    assert_close(key_cache, ref_caches[0], "key_cache")
    assert_close(value_cache, ref_caches[1], "value_cache")
    # The padding token's row belongs to no request: left unwritten.
    rows = sum(query_lens)
    assert_close(out[:rows], expected[:rows], "attention output")


@pytest.mark.parametrize("is_rotary", [False, True])
def test_fp8_kv_cache_matches_torch_backend(is_rotary):
    """Both backends write and read an FP8 cache with the same scales alike (prefill and
    decode rows in one step)."""
    seq_lens, query_lens = [20, 3, 33], [5, 1, 17]
    block_size, num_heads, num_kv_heads, head_dim = 16, 4, 2, 32
    meta, num_blocks = _metadata(seq_lens, query_lens, block_size, 4, DEVICE)
    positions = torch.cat([torch.arange(s - q, s) for s, q in zip(seq_lens, query_lens,
                                                                   strict=True)]
                          + [torch.tensor([0])]).to(DEVICE)
    num_tokens = positions.shape[0]
    query = torch.randn(num_tokens, num_heads, head_dim, device=DEVICE)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE) * 3
    value = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE)
    cache_shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, device=DEVICE).to(torch.float8_e4m3fn)
    value_cache = torch.randn(cache_shape, device=DEVICE).to(torch.float8_e4m3fn)
    ref_caches = key_cache.clone(), value_cache.clone()
    backends = TorchAttentionBackend(), get_attention_backend("triton", DEVICE)
    for backend in backends:
        backend.k_scale, backend.v_scale = 0.5, 2.0
    if is_rotary:
        rotary = _Rotary(_cos_sin_cache(32, 64, DEVICE), True)
        expected = backends[0].forward_rotary(positions, rotary, query.clone(), key, value,
                                              *ref_caches, meta, 0.2)
        out = backends[1].forward_rotary(positions, rotary, query, key, value, key_cache,
                                         value_cache, meta, 0.2)
    else:
        expected = backends[0].forward(query[:-1], key, value, *ref_caches, meta, 0.2)
        out = backends[1].forward(query[:-1], key, value, key_cache, value_cache, meta, 0.2)
    assert_close(key_cache.float(), ref_caches[0].float(), "key_cache")
    assert_close(value_cache.float(), ref_caches[1].float(), "value_cache")
    assert_close(out[:num_tokens - 1], expected[:num_tokens - 1], "attention output")


@pytest.mark.parametrize("split, prefix", [(False, 0), (True, 2), (True, 0)])
@pytest.mark.parametrize("k_scale", [1.0, 0.5])
def test_prefill_attention_writes_into_a_given_view(split, prefix, k_scale):
    """``out=`` (a view of a larger buffer, as the graphs cut at attention pass): written in
    place, the same values as a new tensor, the rows past it untouched; with the split and
    the one-query rows unknown (a row past the batch) through a buffer of its own."""
    from kernels.prefill_attention import prefill_attention

    seq_lens, query_lens, block_size = [20, 3, 33, 9], [1, 1, 3, 17], 16
    meta, num_blocks = _metadata(seq_lens, query_lens, block_size, 4, DEVICE)
    query, _, _, key_cache, value_cache, _ = _step(sum(query_lens), num_blocks, block_size)
    args = (query, key_cache, value_cache, meta.block_tables, meta.seq_lens,
            meta.query_start_loc, 0.2)
    kwargs = dict(max_query_len=17, split_one_token=split, one_token_prefix=prefix,
                  k_scale=k_scale)
    want = prefill_attention(*args, **kwargs)
    buffer = torch.full((query.shape[0] + 5, *query.shape[1:]), float("nan"), device=DEVICE)
    got = prefill_attention(*args, **kwargs, out=buffer[:query.shape[0]])
    assert got.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer[:query.shape[0]], want)
    assert buffer[query.shape[0]:].isnan().all()


def test_prefill_attention_refuses_an_out_it_cannot_write():
    from kernels.prefill_attention import prefill_attention

    meta, num_blocks = _metadata([20, 3], [2, 1], 16, 4, DEVICE)
    query, _, _, key_cache, value_cache, _ = _step(3, num_blocks, 16)
    for out in (torch.empty(4, *query.shape[1:], device=DEVICE),
                torch.empty_like(query, dtype=torch.float16),
                torch.empty(query.shape[2], *query.shape[:2], device=DEVICE).permute(1, 2, 0)):
        with pytest.raises(ValueError, match="out must"):
            prefill_attention(query, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                              meta.query_start_loc, 0.2, out=out)


class _Cuts:
    """Stands where worker_svc.piecewise_graph.Capture does during a capture: static slots
    for the cache writes, each call's closure kept, a buffer handed back for the output."""

    def __init__(self, slots):
        self.slots = slots
        self.calls = []

    def slot_mapping(self, metadata):
        return self.slots

    def cut(self, attend, query, metadata):
        self.calls.append((attend, query.clone(), metadata))
        return torch.full_like(query, float("nan"))


@pytest.mark.parametrize("rotary_path", [False, True])
def test_a_captured_call_replays_as_the_direct_call(rotary_path):
    """While a capture is on, the backend writes the cache at the capture's static slots
    (the step's, -1 on padded rows, as the runner fills them before a replay) and hands the
    attention over; its closure, run later on the queries as handed over (the graphs'
    shared buffer, sliced to the step's tokens) and the step's metadata, computes what the
    direct call computes, caches included."""
    seq_lens, query_lens, block_size = [20, 3, 33], [5, 1, 17], 16
    meta, num_blocks = _metadata(seq_lens, query_lens, block_size, 4, DEVICE)
    meta = dataclasses.replace(meta, slot_mapping=meta.slot_mapping[:-1])
    n = sum(query_lens)
    positions = torch.cat([torch.arange(s - q, s) for s, q in zip(seq_lens, query_lens,
                                                                   strict=True)]).to(DEVICE)
    rotary = _Rotary(_cos_sin_cache(24, 64, DEVICE), True)
    query, key, value, key_cache, value_cache, ref_caches = _step(n, num_blocks, block_size)
    backend = get_attention_backend("triton", DEVICE)
    padded = [torch.cat([t, torch.randn(9, *t.shape[1:], device=DEVICE)])
              for t in (query, key, value)]
    static_positions = torch.cat([positions, torch.zeros(9, dtype=positions.dtype,
                                                         device=DEVICE)])
    static_slots = torch.cat([meta.slot_mapping.long(),
                              torch.full((9,), -1, dtype=torch.long, device=DEVICE)])

    def call(b, q, k, v, kc, vc):
        if rotary_path:
            return b.forward_rotary(static_positions[:q.shape[0]], rotary, q, k, v, kc, vc,
                                    meta, 0.2, 8)
        return b.forward(q, k, v, kc, vc, meta, 0.2, 8)

    backend.piecewise = cuts = _Cuts(static_slots)
    placeholder = call(backend, *[t.clone() for t in padded], key_cache, value_cache)
    backend.piecewise = None
    assert placeholder.isnan().all() and len(cuts.calls) == 1
    attend, handed_query, _ = cuts.calls[0]
    shared_out = torch.full((n + 9, *query.shape[1:]), float("nan"), device=DEVICE)
    got = attend(handed_query[:n], meta, shared_out[:n], True)
    assert got.data_ptr() == shared_out.data_ptr()  # written in place
    assert shared_out[n:].isnan().all()
    want = call(backend, query.clone(), key.clone(), value.clone(), *ref_caches)
    assert_close(got, want, "attention output")
    assert_close(key_cache, ref_caches[0], "key_cache")
    assert_close(value_cache, ref_caches[1], "value_cache")
    # Unchecked (a step's later layers), the same output.
    again = attend(handed_query[:n], meta, torch.empty_like(shared_out[:n]), False)
    assert_close(again, want, "attention output, unchecked")
