import pytest
import torch

from kernels import torch_ref
from kernels.prefill_attention import prefill_attention, uses_tma
from tests.kernels.conftest import (
    DEVICE,
    GPU_DTYPES,
    HAS_CUDA,
    SMALL_DTYPES,
    assert_close,
    make_paged_kv,
    needs_gpu,
    poisoned_allocations,
)


def _check(seq_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int,
           head_dim: int, block_size: int, dtype: torch.dtype, device: torch.device,
           sliding_window: int | None = None, pass_max_query_len: bool = True,
           logit_softcap: float | None = None, tma: bool | None = None,
           table_dtype: torch.dtype = torch.int32) -> None:
    """Compare with the torch reference; ``tma`` asserts which kernel runs, and with it
    the cache slots past each sequence hold NaN (no kernel may read them into a result)."""
    key_cache, value_cache, block_tables, seq = make_paged_kv(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, device)
    block_tables = block_tables.to(table_dtype)
    if tma is not None:
        assert uses_tma(key_cache.new_empty(1, 1, head_dim), key_cache, value_cache,
                        max(query_lens)) == tma
        for i, n in enumerate(seq_lens):
            if n % block_size:
                last = block_tables[i, (n - 1) // block_size]
                key_cache[last, n % block_size:] = float("nan")
                value_cache[last, n % block_size:] = float("nan")
    qsl = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    qsl = qsl.to(device)
    query = torch.randn(sum(query_lens), num_heads, head_dim, device=device).to(dtype)
    if logit_softcap is not None:
        query = query * 8  # scores well past the cap, so capping changes them
    scale = head_dim ** -0.5
    with poisoned_allocations():
        out = prefill_attention(query, key_cache, value_cache, block_tables, seq, qsl, scale,
                                sliding_window,
                                max_query_len=max(query_lens) if pass_max_query_len else None,
                                logit_softcap=logit_softcap)
    expected = torch_ref.paged_attention(query, key_cache, value_cache, block_tables, seq,
                                         qsl, scale, sliding_window, logit_softcap)
    assert_close(out, expected, "prefill attention", dtype)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_prefill_matches_reference(num_heads, num_kv_heads, dtype):
    # Whole prompts of lengths around the block and tile boundaries.
    _check([1, 15, 17, 33], [1, 15, 17, 33], num_heads, num_kv_heads, 32, 16, dtype, DEVICE)


def test_prefill_chunks_after_cached_prefix():
    # Chunks starting mid-sequence (prefix-cache hit or an earlier chunk), plus a decode row.
    _check([40, 17, 33, 20], [7, 17, 1, 19], 4, 2, 32, 16, torch.float32, DEVICE,
           pass_max_query_len=False)


@pytest.mark.parametrize("sliding_window", [1, 10])
def test_prefill_sliding_window_shorter_than_context(sliding_window):
    _check([45, 17, 9], [30, 17, 2], 2, 1, 32, 16, torch.float32, DEVICE, sliding_window)


@pytest.mark.parametrize("sliding_window", [None, 10])
def test_prefill_logit_softcap(sliding_window):
    _check([45, 17, 9], [30, 17, 1], 4, 2, 32, 16, torch.float32, DEVICE, sliding_window,
           logit_softcap=5.0)


def test_prefill_odd_head_dim_and_block_size():
    _check([21, 3], [21, 2], 2, 2, 40, 8, torch.float32, DEVICE)


def test_prefill_rejects_bad_arguments():
    key_cache, value_cache, block_tables, seq = make_paged_kv([5], 1, 16, 16,
                                                              torch.float32, DEVICE)
    query = torch.randn(5, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="query_start_loc"):
        prefill_attention(query, key_cache, value_cache, block_tables, seq,
                          torch.tensor([0, 3, 5], dtype=torch.int32, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        prefill_attention(query, key_cache, value_cache, block_tables, seq,
                          torch.tensor([0, 5], dtype=torch.int32, device=DEVICE), 1.0, 0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("seq_lens,query_lens,sliding_window,logit_softcap", [
    ([4096, 4096], [4096, 4096], None, None),
    ([3000, 1, 700, 5000], [1000, 1, 700, 333], None, None),
    ([6000, 129], [2500, 129], 1024, None),
    ([3000, 129], [1000, 129], 1024, 50.0),
])
def test_prefill_gpu(seq_lens, query_lens, sliding_window, logit_softcap, dtype):
    _check(seq_lens, query_lens, 32, 8, 128, 16, dtype, torch.device("cuda"), sliding_window,
           logit_softcap=logit_softcap)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (9, 0),
                    reason="the TMA kernel needs compute capability 9.0+")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [32, 64, 256])
@pytest.mark.parametrize("seq_lens,query_lens,sliding_window,logit_softcap", [
    ([4096, 4096], [4096, 4096], None, None),
    ([3000, 1, 700, 5000], [1000, 1, 700, 333], None, None),
    ([6000, 129], [2500, 129], 1024, None),
    ([3000, 129], [1000, 129], 1024, 50.0),
    ([100, 77, 95], [64, 77, 3], None, None),
])
def test_prefill_tma_gpu(seq_lens, query_lens, sliding_window, logit_softcap, block_size,
                         dtype):
    _check(seq_lens, query_lens, 32, 8, 128, block_size, dtype, torch.device("cuda"),
           sliding_window, logit_softcap=logit_softcap, tma=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (9, 0),
                    reason="the TMA kernel needs compute capability 9.0+")
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(8, 8, 64), (16, 2, 128),
                                                             (4, 1, 64)])
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_prefill_tma_head_shapes_gpu(num_heads, num_kv_heads, head_dim, table_dtype):
    _check([1500, 300], [1500, 200], num_heads, num_kv_heads, head_dim, 64, torch.bfloat16,
           torch.device("cuda"), tma=True, table_dtype=table_dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (9, 0),
                    reason="the TMA kernel needs compute capability 9.0+")
def test_prefill_tma_applies_cache_scales_gpu():
    # k_scale / v_scale apply to any cache, as in the pointer kernel and the reference.
    device = torch.device("cuda")
    key_cache, value_cache, block_tables, seq = make_paged_kv([700, 300], 2, 128, 64,
                                                              torch.bfloat16, device)
    qsl = torch.tensor([0, 700, 900], dtype=torch.int32, device=device)
    query = torch.randn(900, 8, 128, device=device).to(torch.bfloat16)
    assert uses_tma(query, key_cache, value_cache, 700)
    args = (query, key_cache, value_cache, block_tables, seq, qsl, 128 ** -0.5)
    out = prefill_attention(*args, max_query_len=700, k_scale=0.5, v_scale=2.0)
    expected = torch_ref.paged_attention(*args, k_scale=0.5, v_scale=2.0)
    assert_close(out, expected, "prefill attention with cache scales", torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
def test_prefill_takes_the_general_kernel_where_tma_does_not_apply():
    # Blocks of 16, an FP32 cache, a strided pattern, short chunks: the pointer kernel.
    _check([700, 300], [700, 200], 8, 2, 128, 16, torch.bfloat16, torch.device("cuda"),
           tma=False)
    _check([700, 300], [700, 200], 8, 2, 128, 64, torch.float32, torch.device("cuda"),
           tma=False)
    _check([700, 300], [40, 20], 8, 2, 128, 64, torch.bfloat16, torch.device("cuda"),
           tma=False)
    cache = torch.zeros(4, 64, 2, 128, dtype=torch.bfloat16, device="cuda")
    query = torch.zeros(1, 8, 128, dtype=torch.bfloat16, device="cuda")
    assert not uses_tma(query, cache, cache, 4096, attention_stride=8)


def test_one_token_requests_go_through_the_decode_kernel():
    """``attend_one_token_requests``: the requests of one query get the reference's output
    in their rows, by the decode kernel; every other request's rows are left as they were
    (a prefill kernel writes them next) and only the row past the batch takes their zeros;
    the rows it derives are kept for the step's other layers."""
    from kernels.prefill_attention import attend_one_token_requests

    torch.manual_seed(0)
    seq_lens, query_lens = [40, 90, 33, 70, 7], [1, 5, 1, 0, 1]
    kc, vc, tables, seq = make_paged_kv(seq_lens, 2, 32, 16, torch.float32, DEVICE)
    qsl = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32).to(DEVICE)
    query = torch.randn(sum(query_lens), 4, 32, device=DEVICE)
    out = torch.full((query.shape[0] + 1, 4, 32), float("nan"), device=DEVICE)
    cache = {}
    attend_one_token_requests(query, kc, vc, tables, seq, qsl, 0.2, out, cache)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 0.2)
    one_token = [int(qsl[i]) for i, n in enumerate(query_lens) if n == 1]
    assert_close(out[one_token], expected[one_token], "one-token rows")
    others = [r for r in range(query.shape[0]) if r not in one_token]
    assert out[others].isnan().all()
    assert (out[-1] == 0).all()
    # the rows, and the decode kernel's launch for the step's other layers
    assert {k if isinstance(k, str) else k[0] for k in cache} == {"one_token_requests",
                                                                  "decode_plan"}
    with pytest.raises(ValueError, match="out must have"):
        attend_one_token_requests(query, kc, vc, tables, seq, qsl, 0.2, out[:-1])


def test_one_token_requests_get_no_query_tile():
    from kernels.prefill_args import query_tiles

    qsl = torch.tensor([0, 1, 301, 302, 304], dtype=torch.int32)
    seq = torch.tensor([50, 300, 9, 20], dtype=torch.int32)
    tiles = query_tiles(qsl, seq, 304, 300, 128, skip_one_token=True)
    # Request 1's three tiles (latest first) and request 3's one; the rest empty slots.
    assert tiles[:, 0].tolist()[:4] == [1, 1, 1, 3]
    assert (tiles[4:] == -1).all()
    assert query_tiles(qsl, seq, 304, 300, 128)[:, 0].tolist()[:6] == [0, 1, 1, 1, 2, 3]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_m", [16, 64])
def test_query_tiles_kernel_matches_the_torch_ops(seed, block_m):
    """One launch of ``_query_tiles_kernel`` writes the rows the torch ops build: random
    batches of one-query, empty and long requests, past a prefix of one-query requests
    or not, with and without the one-query requests skipped, over more requests than a
    block of the kernel takes, with the longest query as its bound or a looser one."""
    from kernels import prefill_args
    from kernels.prefill_args import launch_query_tiles, query_tiles_by_torch

    gen = torch.Generator().manual_seed(seed)
    num_reqs = [3, 40, prefill_args._TILES_BLOCK_B + 37, 7][seed]
    lens = torch.randint(0, 3 * block_m, (num_reqs,), generator=gen)
    lens[torch.rand(num_reqs, generator=gen) < 0.4] = 1
    prefix = [0, 5, 30, 0][seed]
    lens[:prefix] = 1
    qsl = torch.zeros(num_reqs + 1, dtype=torch.int32)
    qsl[1:] = lens.cumsum(0)
    seq = (lens + torch.randint(0, 500, (num_reqs,), generator=gen)).to(torch.int32)
    max_len = int(lens.max())
    tokens = int(qsl[-1]) - prefix
    for skip in (False, True):
        for bound in (max_len, max_len + 2 * block_m):
            got = launch_query_tiles(qsl.to(DEVICE), seq.to(DEVICE), tokens, bound, block_m,
                                     skip_one_token=skip, first_request=prefix)
            want = query_tiles_by_torch(qsl, seq, tokens, bound, block_m,
                                        skip_one_token=skip, first_request=prefix)
            assert got.dtype == torch.int32
            assert torch.equal(got.cpu(), want), (skip, bound)
    # Lists with other strides (views of wider ones) give the same rows.
    wide = torch.stack((qsl, qsl), dim=1)[:, 0], torch.stack((seq, seq), dim=1)[:, 0]
    got = launch_query_tiles(wide[0].to(DEVICE), wide[1].to(DEVICE), tokens, max_len, block_m,
                             first_request=prefix)
    assert torch.equal(got.cpu(), query_tiles_by_torch(qsl, seq, tokens, max_len, block_m,
                                                       first_request=prefix))


@pytest.mark.sm90
def test_query_tiles_kernel_compiles_for_sm90():
    """The tiles kernel compiles for a GPU (the interpreter above does not compile it)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from kernels import prefill_args
    from tests.kernels.sm90_ptx import compile_triton_for_sm90

    ptx = compile_triton_for_sm90(
        "kernels.prefill_args", "_query_tiles_kernel",
        dict(qsl_ptr="*i32", seq_ptr="*i32", rows_ptr="*i32"),
        dict(BLOCK_B=prefill_args._TILES_BLOCK_B, BLOCK_S=256))
    assert "st.global" in ptx


@pytest.mark.parametrize("query_lens,pattern", [
    ([1, 5, 1, 40, 1], {}),
    ([1, 1, 1], {}),  # every request of one query (a step that is not decode-only)
    ([3, 1, 20, 1], dict(sliding_window=12)),
    ([1, 9, 1], dict(logit_softcap=5.0)),
    ([1, 30, 1, 2], dict(attention_stride=8)),
    ([1, 17, 1], dict(k_scale=0.5, v_scale=2.0)),
])
@pytest.mark.parametrize("split", [True, False])
def test_split_one_token_matches_the_reference(query_lens, pattern, split, monkeypatch):
    """``split_one_token`` (the default): the one-query requests through the decode kernel
    and the rest through the prefill kernel give the reference's output in every row, also
    on a second call that reuses what the first kept in ``batch_cache`` (as a step's next
    layer); without it the prefill kernel's tiles take them, with the same outputs. The
    host's bound of the lengths reaches the decode kernel (it sizes the split there)."""
    from kernels import prefill_attention as module

    bounds = []

    def decode(*args, **kwargs):
        bounds.append(kwargs.get("max_seq_len"))
        return real_decode(*args, **kwargs)

    real_decode = module.paged_decode_attention
    monkeypatch.setattr(module, "paged_decode_attention", decode)
    torch.manual_seed(1)
    seq_lens = [q + c for q, c in zip(query_lens, [60, 20, 35, 0, 90], strict=False)]
    dtype = torch.float32
    scales = {k: pattern.pop(k) for k in ("k_scale", "v_scale") if k in pattern}
    kc, vc, tables, seq = make_paged_kv(seq_lens, 2, 32, 16, dtype, DEVICE)
    if scales:  # an FP8 cache
        kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    qsl = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32).to(DEVICE)
    query = torch.randn(sum(query_lens), 4, 32, device=DEVICE)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 0.2, **pattern,
                                         **scales)
    cache = {}
    for _ in range(2):
        out = prefill_attention(query, kc, vc, tables, seq, qsl, 0.2,
                                max_query_len=max(query_lens), batch_cache=cache,
                                split_one_token=split, max_seq_len=max(seq_lens),
                                **pattern, **scales)
        assert out.shape == query.shape and out.is_contiguous()
        assert_close(out, expected, "one-token requests", scale=4 if scales else 1)
    assert ("one_token_requests" in cache) == split
    assert bounds == ([max(seq_lens)] * 2 if split else [])


@pytest.mark.sm90
def test_tma_kernel_compiles_for_sm90():
    """The TMA kernel (Hopper only, so its results are checked on a GPU) compiles for sm_90
    with its tile from the batch's query-tile list: key and value tiles by bulk copies, and
    the query tile too where it is given as a descriptor."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from tests.kernels.sm90_ptx import compile_triton_for_sm90

    copies = {}
    for q_desc in (False, True):
        ptx = compile_triton_for_sm90(
            "kernels.prefill_attention", "_prefill_attention_tma_kernel",
            dict(bt_ptr="*i32", tiles_ptr="*i32", out_ptr="*bf16", scale_log2="fp32",
                 softcap_mul="fp32", softcap_log2="fp32", v_scale="fp32",
                 desc_k="tensordesc<bf16[32, 128]>", desc_v="tensordesc<bf16[32, 128]>",
                 q_ptr="tensordesc<bf16[128, 128]>" if q_desc else "*bf16"),
            dict(GROUP=4, HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, PIECE=32,
                 HAS_WINDOW=False, HAS_SOFTCAP=False, Q_DESC=q_desc),
            options={"num_warps": 4, "num_stages": 3})
        copies[q_desc] = ptx.count("cp.async.bulk.tensor")
    assert 0 < copies[False] < copies[True]
