"""``kernels.chunk_attention``: short query chunks over paged contexts, the keys split across
programs, against the torch reference (through ``prefill_attention(chunk=True)``, as
served, and directly with the split count forced)."""

import pytest
import torch

from kernels import chunk_attention as chunk_kernel
from kernels import torch_ref
from kernels.prefill_attention import prefill_attention
from tests.kernels.conftest import (
    DEVICE,
    GPU_DTYPES,
    SMALL_DTYPES,
    assert_close,
    make_paged_kv,
    needs_gpu,
    poisoned_allocations,
)


def _batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
           device, fp8=False, seed=0):
    torch.manual_seed(seed)
    kc, vc, tables, seq = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size,
                                        torch.float32 if fp8 else dtype, device)
    if fp8:
        kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    qsl = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32).to(device)
    query = torch.randn(sum(query_lens), num_heads, head_dim, device=device).to(dtype)
    return query, kc, vc, tables, seq, qsl


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 1), (6, 2), (8, 2)])
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_matches_reference(num_heads, num_kv_heads, num_splits, dtype):
    """Chunks after cached prefixes, one-query requests among them, GQA groups of 1-4 (3:
    rows past the group's last whole query), one to sixteen parts of the keys (more parts
    than some tiles have key tiles: empty parts), every output row written."""
    seq_lens, query_lens = [40, 17, 70, 5, 33], [7, 17, 1, 5, 20]
    query, kc, vc, tables, seq, qsl = _batch(seq_lens, query_lens, num_heads, num_kv_heads,
                                             32, 16, dtype, DEVICE)
    out = torch.full_like(query, float("nan"))
    with poisoned_allocations():
        chunk_kernel.chunk_attention(query, kc, vc, tables, seq, qsl, 0.3, out,
                                     max(query_lens), num_splits=num_splits)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 0.3)
    assert_close(out, expected, "chunk attention", dtype)


@pytest.mark.parametrize("pattern", [dict(sliding_window=1), dict(sliding_window=12),
                                     dict(logit_softcap=5.0),
                                     dict(sliding_window=9, logit_softcap=5.0)])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_window_and_softcap(pattern, num_splits):
    """A window shorter than the chunk (its first keys visible to no later query of the
    tile) and the logit cap, split and not."""
    query, kc, vc, tables, seq, qsl = _batch([45, 17, 9], [30, 17, 2], 4, 2, 32, 16,
                                             torch.float32, DEVICE)
    if "logit_softcap" in pattern:
        query = query * 8  # scores well past the cap
    out = torch.full_like(query, float("nan"))
    chunk_kernel.chunk_attention(query, kc, vc, tables, seq, qsl, 0.2, out, 30,
                                 num_splits=num_splits, **pattern)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 0.2, **pattern)
    assert_close(out, expected, "chunk attention")


@pytest.mark.parametrize("split", [True, False])
def test_served_through_prefill_attention(split):
    """``prefill_attention(chunk=True)``: one-query requests first and known
    (``one_token_prefix``: the chunk kernel's tiles start past them), or not known (the
    decode kernel's gather, the chunk kernel skipping those requests), or taken by the
    chunk kernel's own tiles without the split; a second call reuses the step's tiles;
    an FP8 cache's scales."""
    query_lens = [1, 1, 1, 12, 3, 30]
    seq_lens = [50, 9, 70, 40, 3, 90]
    query, kc, vc, tables, seq, qsl = _batch(seq_lens, query_lens, 4, 2, 32, 16,
                                             torch.float32, DEVICE)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 0.2)
    for prefix in (3, 0):
        cache = {}
        for _ in range(2):
            with poisoned_allocations():
                out = prefill_attention(query, kc, vc, tables, seq, qsl, 0.2,
                                        max_query_len=30, batch_cache=cache,
                                        split_one_token=split, one_token_prefix=prefix,
                                        chunk=True)
            assert_close(out, expected, f"prefix {prefix}")
        assert sum(k[0] == "chunk_plan" for k in cache if isinstance(k, tuple)) == 1
    kc8, vc8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    expected = torch_ref.paged_attention(query, kc8, vc8, tables, seq, qsl, 0.2,
                                         k_scale=0.5, v_scale=2.0)
    out = prefill_attention(query, kc8, vc8, tables, seq, qsl, 0.2, max_query_len=30,
                            split_one_token=split, one_token_prefix=3 if split else 0,
                            k_scale=0.5, v_scale=2.0, chunk=True)
    assert_close(out, expected, "FP8 cache", scale=4)


def test_split_count():
    """Splits until the tiles fill ``PROGRAMS_PER_SM`` programs an SM, at most
    ``MAX_SPLITS``, and no part shorter than ``MIN_KEYS_PER_SPLIT`` keys of the bound."""
    cpu = torch.device("cpu")  # num_sms: 4 off CUDA
    target = chunk_kernel.PROGRAMS_PER_SM * 4
    assert chunk_kernel.pick_num_splits(64, 16, target // 4, 1 << 20, cpu) == 1
    # Three quarters of the target is enough.
    assert chunk_kernel.pick_num_splits(48, 16, target // 4, 1 << 20, cpu) == 1
    assert chunk_kernel.pick_num_splits(16, 16, 1, 1 << 20, cpu) == min(
        target, chunk_kernel.MAX_SPLITS)
    assert chunk_kernel.pick_num_splits(16, 16, 1, 3 * chunk_kernel.MIN_KEYS_PER_SPLIT,
                                        cpu) == 3
    assert chunk_kernel.pick_num_splits(16, 16, 1, 10, cpu) == 1


def test_rejects_bad_arguments():
    query, kc, vc, tables, seq, qsl = _batch([9], [9], 4, 1, 32, 16, torch.float32, DEVICE)
    out = torch.empty_like(query)
    with pytest.raises(ValueError, match="launch rows"):
        chunk_kernel.chunk_attention(query, kc, vc, tables, seq, qsl, 0.2, out, 9,
                                     launch=(2, 16, 4, 1))
    with pytest.raises(ValueError, match="attention_stride"):
        prefill_attention(query, kc, vc, tables, seq, qsl, 0.2, attention_stride=4,
                          chunk=True)


def test_not_served_off_the_gpu_or_past_its_tokens():
    query = torch.empty(8, 4, 32)
    assert not chunk_kernel.serves(query, None, 8)  # CPU tensors
    if torch.cuda.is_available():
        q = query.cuda()
        assert chunk_kernel.serves(q, None, chunk_kernel.MAX_TOKENS)
        assert not chunk_kernel.serves(q, None, chunk_kernel.MAX_TOKENS + 1)
        limit = chunk_kernel.MAX_TOKENS_BESIDE_GLUON
        assert chunk_kernel.serves(q, None, limit, beside_gluon=True)
        assert not chunk_kernel.serves(q, None, limit + 1, beside_gluon=True)
        assert not chunk_kernel.serves(q, 8, 8)
        assert not chunk_kernel.serves(q, None, 0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("seq_lens,query_lens,pattern", [
    ([4096], [64], {}),
    ([1, 3000, 700, 5000], [1, 16, 37, 100], {}),
    ([3000, 129, 64], [1, 40, 64], dict(sliding_window=1024)),
    ([3000, 129], [50, 129], dict(logit_softcap=50.0)),
    ([20000, 20000], [2, 1], {}),
])
def test_gpu(seq_lens, query_lens, pattern, fp8, dtype):
    """Llama-3-8B's heads at serving lengths through ``prefill_attention(chunk=True)`` (the
    launch and splits it picks), over 16-bit and FP8 caches."""
    if fp8 and dtype == torch.float32:
        pytest.skip("FP8 caches serve 16-bit models")
    dev = torch.device("cuda")
    query, kc, vc, tables, seq, qsl = _batch(seq_lens, query_lens, 32, 8, 128, 16, dtype,
                                             dev, fp8=fp8)
    scales = dict(k_scale=0.5, v_scale=2.0) if fp8 else {}
    with poisoned_allocations():
        out = prefill_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                max_query_len=max(query_lens), split_one_token=False,
                                chunk=True, **pattern, **scales)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                         **pattern, **scales)
    assert_close(out, expected, "chunk attention", dtype, scale=4 if fp8 else 1)


@pytest.mark.gpu
@needs_gpu
def test_gpu_step_layers_share_the_plan():
    """A step's layers share its plan (other caches, queries and outputs): after the first
    they launch straight to the compiled kernels where ``GRIDLLM_DIRECT_LAUNCH=1``
    (``kernels._launch``), and a layer whose query starts off a 16-byte boundary goes back
    through ``kernel[grid]`` (another compiled variant); every layer against the
    reference."""
    from kernels import _launch

    dev = torch.device("cuda")
    seq_lens, query_lens = [3000, 700], [16, 37]
    layers = [_batch(seq_lens, query_lens, 32, 8, 128, 16, torch.bfloat16, dev, seed=s)
              for s in range(3)]
    query = layers[2][0]
    padded = torch.empty(query.numel() + 1, dtype=query.dtype, device=dev)
    layers[2] = (padded[1:].view(query.shape).copy_(query),) + layers[2][1:]
    assert layers[2][0].data_ptr() % 16 != 0
    cache = {}
    for query, kc, vc, tables, seq, qsl in layers:
        out = prefill_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                max_query_len=37, batch_cache=cache, split_one_token=False,
                                chunk=True, max_seq_len=3000)
        expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5)
        assert_close(out, expected, "chunk attention", torch.bfloat16)
    (plan,) = [v for k, v in cache.items() if isinstance(k, tuple) and k[0] == "chunk_plan"]
    assert plan.num_splits > 1
    assert (plan.attend._kernel is not None) == _launch.DIRECT_LAUNCH
    assert (plan.merge._kernel is not None) == _launch.DIRECT_LAUNCH
