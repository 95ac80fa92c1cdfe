import pytest
import torch

from kernels import torch_ref
from kernels.paged_decode_attention import paged_decode_attention, pick_num_splits
from tests.kernels.conftest import (
    DEVICE,
    GPU_DTYPES,
    SMALL_DTYPES,
    assert_close,
    make_paged_kv,
    needs_gpu,
    poisoned_allocations,
)


def _check(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
           block_size: int, dtype: torch.dtype, device: torch.device,
           sliding_window: int | None = None, num_splits: int | None = None,
           logit_softcap: float | None = None, **launch) -> None:
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
                                     logit_softcap=logit_softcap, **launch)
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
@pytest.mark.parametrize("prefetch_table", [False, True])
@pytest.mark.parametrize("sliding_window", [None, 10])
def test_decode_block_numbers_one_tile_ahead_or_not(num_splits, prefetch_table,
                                                    sliding_window):
    """Both ways of loading a tile's block numbers, with and without splits (the launch
    override the attention sweep uses)."""
    _check([1, 17, 50], 4, 2, 32, 16, torch.float32, DEVICE, sliding_window, num_splits,
           prefetch_table=prefetch_table)


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


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_writes_into_a_view_of_a_bigger_output(num_splits):
    """``out``: the rows of a step's output (rows 1-2 of 4, strided heads), the rest kept."""
    key_cache, value_cache, block_tables, seq = make_paged_kv(
        [9, 40], 2, 16, 16, torch.float32, DEVICE)
    query = torch.randn(2, 4, 16, device=DEVICE)
    step = torch.full((4, 4, 32), 7.0, device=DEVICE)
    view = step[1:3, :, :16]
    got = paged_decode_attention(query, key_cache, value_cache, block_tables, seq, None, 0.25,
                                 num_splits=num_splits, out=view)
    assert got.data_ptr() == view.data_ptr()
    expected = torch_ref.paged_attention(query, key_cache, value_cache, block_tables, seq,
                                         torch.arange(3, device=DEVICE), 0.25)
    assert_close(step[1:3, :, :16], expected, "decode attention into a view", torch.float32)
    assert (step[0] == 7).all() and (step[3] == 7).all() and (step[:, :, 16:] == 7).all()
    with pytest.raises(ValueError, match="out"):
        paged_decode_attention(query, key_cache, value_cache, block_tables, seq, None, 0.25,
                               out=step[:3, :, :16])
    with pytest.raises(ValueError, match="out"):
        paged_decode_attention(query, key_cache, value_cache, block_tables, seq, None, 0.25,
                               out=view.double())


@pytest.mark.parametrize("max_seq_len", [None, 64])
def test_a_steps_layers_share_one_launch(max_seq_len):
    """``batch_cache``: a step's first call builds the launch (split count, the parts'
    buffers, both launches' compile-time arguments), its other layers' calls over their
    own caches reuse it, and each layer gets the reference's output; a call of another
    batch shape in the same step (fewer requests) gets its own."""
    from kernels.paged_decode_attention import _DecodePlan

    torch.manual_seed(0)
    seq_lens = [9, 40, 33]
    _, _, tables, seq = make_paged_kv(seq_lens, 2, 32, 16, torch.float32, DEVICE)
    wide = torch.zeros(3, 64, dtype=tables.dtype, device=DEVICE)  # a long context's table
    wide[:, :tables.shape[1]] = tables
    qsl = torch.arange(4, device=DEVICE)
    cache = {}
    for layer in range(3):
        kc, vc, _, _ = make_paged_kv(seq_lens, 2, 32, 16, torch.float32, DEVICE)
        query = torch.randn(3, 4, 32, device=DEVICE)
        scale = 0.2 + 0.1 * layer  # per-layer values go through each call
        with poisoned_allocations():
            out = paged_decode_attention(query, kc, vc, wide, seq, None, scale,
                                         max_seq_len=max_seq_len, batch_cache=cache)
        expected = torch_ref.paged_attention(query, kc, vc, wide, seq, qsl, scale)
        assert_close(out, expected, f"decode attention, layer {layer}")
        plans = [v for v in cache.values() if isinstance(v, _DecodePlan)]
        assert len(plans) == 1
        if layer == 0:
            first = plans[0]
        assert plans[0] is first
    assert first.num_splits > 1 and first.part_acc is not None
    paged_decode_attention(query[:2], kc, vc, wide[:2], seq[:2], None, 0.2,
                           max_seq_len=max_seq_len, batch_cache=cache)
    assert len(cache) == 2


@pytest.mark.sm90
def test_split_merge_loads_everything_in_one_round_trip():
    """The merge kernel (sm_90, compiled without a GPU) issues all its loads, the splits'
    sums included, before its first reduction: it waits on L2 once, not once for the
    maxima and again for the sums."""
    import re

    from tests.kernels.sm90_ptx import compile_triton_for_sm90

    ptx = compile_triton_for_sm90(
        "kernels.paged_decode_attention", "_paged_decode_reduce_kernel",
        {"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "out_ptr": "*bf16"},
        dict(HEAD_DIM=128, BLOCK_D=128, NUM_SPLITS=64, BLOCK_S=64, USE_GDC=True))
    ops = re.findall(r"\b(ld\.global|shfl\.sync|bar\.sync)", ptx)
    first_sync = min(ops.index(op) for op in ("shfl.sync", "bar.sync"))
    assert "ld.global" in ops[:first_sync]
    assert "ld.global" not in ops[first_sync:]


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
    assert pick_num_splits(1, 1, 25, dev) == 1
    assert pick_num_splits(1, 1, 50, dev) == 2  # the context bounds it: 16+ keys a split


def test_one_warp_programs_take_twice_the_splits(monkeypatch):
    """The Gluon kernel's one-warp programs (on an H200's 132 SMs): about eight per SM
    instead of four, up to 128 splits, a floor of 8 keys per split (16 for the tl.dot
    kernel) and the same single split past two programs per SM."""
    import kernels.paged_decode_attention as module

    monkeypatch.setattr(module, "num_sms", lambda device: 132)
    dev = torch.device("cpu")
    for batch, context in ((1, 32768), (4, 32768), (8, 16384), (32, 4096), (1, 4096)):
        assert pick_num_splits(batch, 8, context, dev, one_warp=True) == min(
            2 * pick_num_splits(batch, 8, context, dev), 128, context // 8)
    assert pick_num_splits(1, 1, 1 << 20, dev, one_warp=True) == 128
    assert pick_num_splits(1, 8, 100, dev, one_warp=True) == 8
    assert pick_num_splits(1, 8, 100, dev) == 4
    assert pick_num_splits(1, 8, 160, dev, one_warp=True) == 16
    assert pick_num_splits(256, 8, 8192, dev, one_warp=True) == 1


def test_short_splits_take_fewer_keys_per_iteration(monkeypatch):
    import kernels.paged_decode_attention as module

    monkeypatch.setattr(module, "is_interpreter", lambda: False)
    monkeypatch.setattr(module, "num_sms", lambda device: 132)
    dev, bf16 = torch.device("cpu"), torch.bfloat16
    # Batch 1, 8 KV heads: the SMs would take 64 splits.
    splits = pick_num_splits(1, 8, 256, dev)
    assert splits == 16
    assert module._default_block_n(1, 8, splits, bf16, dev) == 32
    assert module._default_block_n(1, 8, 64, bf16, dev) == 64  # the SMs bound it
    assert module._default_block_n(1, 8, 1, bf16, dev) == 64
    assert module._default_block_n(64, 8, 1, bf16, dev) == 64
    assert module._default_block_n(1, 8, splits, torch.float32, dev) == 32
    # An FP8 cache: 128 keys per iteration, short splits still 32.
    fp8 = torch.float8_e4m3fn
    assert module._default_block_n(64, 8, 1, bf16, dev, fp8) == 128
    assert module._default_block_n(1, 8, 64, bf16, dev, fp8) == 128
    assert module._default_block_n(1, 8, splits, bf16, dev, fp8) == 32


def test_launch_by_programs_per_sm(monkeypatch):
    import kernels.paged_decode_attention as module

    monkeypatch.setattr(module, "is_interpreter", lambda: False)
    monkeypatch.setattr(module, "num_sms", lambda device: 132)
    dev, bf16, fp8 = torch.device("cpu"), torch.bfloat16, torch.float8_e4m3fn
    stages = module._NUM_STAGES
    # One split, 512 programs (under 4 per SM) over an FP8 cache: 64 keys, 2 warps, 3 stages.
    assert module._default_launch(64, 8, 1, bf16, dev, fp8) == (64, 2, 3, False, None)
    assert module._default_launch(64, 8, 1, torch.float32, dev, fp8) == (64, 2, 3, False, None)
    # One split, 7+ programs per SM (924 on 132 SMs), 16-bit queries: 32 keys, one warp.
    assert module._default_launch(116, 8, 1, bf16, dev) == (32, 1, stages, False, None)
    assert module._default_launch(256, 8, 1, bf16, dev) == (32, 1, stages, False, None)
    assert module._default_launch(116, 8, 1, torch.float16, dev, fp8) == \
        (32, 1, stages, False, None)
    # Over an FP8 cache, past 8 programs per SM a register cap (1,280 programs: 168), past
    # 10 also 16 keys per iteration (2,048 programs: 128 registers).
    assert module._default_launch(132, 8, 1, bf16, dev, fp8) == (32, 1, stages, False, None)
    assert module._default_launch(133, 8, 1, bf16, dev, fp8) == (32, 1, stages, False, 168)
    assert module._default_launch(160, 8, 1, bf16, dev, fp8) == (32, 1, stages, False, 168)
    assert module._default_launch(165, 8, 1, bf16, dev, fp8) == (32, 1, stages, False, 168)
    assert module._default_launch(166, 8, 1, bf16, dev, fp8) == (16, 1, stages, False, 128)
    assert module._default_launch(256, 8, 1, bf16, dev, fp8) == (16, 1, stages, False, 128)
    # Split-KV over an FP8 cache under bfloat16 queries, the split count set by the SMs:
    # the transposed products, 64 keys, 2 warps, 3 stages; short splits keep 32 keys.
    assert module._default_launch(1, 8, 64, bf16, dev, fp8) == (64, 2, 3, True, None)
    assert module._default_launch(32, 8, 2, bf16, dev, fp8) == (64, 2, 3, True, None)
    assert module._default_launch(1, 8, 8, bf16, dev, fp8) == (32, 4, stages, False, None)
    # Split-KV over a 16-bit cache, the split count set by the SMs or short splits alike:
    # 32 keys, 4 warps, 3 stages, block numbers loaded with their tile; float32 keeps the
    # heuristic. One split loads them a tile ahead.
    assert module._default_launch(1, 8, 64, bf16, dev) == (32, 4, 3, False, None)
    assert module._default_launch(4, 8, 16, torch.float16, dev) == (32, 4, 3, False, None)
    assert not module._prefetches(64, bf16, module._default_launch(1, 8, 64, bf16, dev))
    assert not module._prefetches(64, fp8, module._default_launch(1, 8, 64, bf16, dev, fp8))
    assert module._default_launch(1, 8, 8, bf16, dev) == (32, 4, 3, False, None)
    assert not module._prefetches(8, bf16, module._default_launch(1, 8, 8, bf16, dev))
    assert module._prefetches(1, bf16, module._default_launch(64, 8, 1, bf16, dev))
    assert module._default_launch(1, 8, 64, torch.float32, dev)[2] == stages
    # Between the two, a float32 or float16 query with splits, a head dim over 128, or a
    # 16-bit cache under 7 per SM: the block_n heuristic with 4 warps.
    assert module._default_launch(115, 8, 1, bf16, dev, fp8) == (128, 4, stages, False, None)
    assert module._default_launch(1, 8, 64, torch.float16, dev, fp8) == \
        (128, 4, stages, False, None)
    assert module._default_launch(1, 8, 64, bf16, dev, fp8, head_dim=256) == \
        (128, 4, stages, False, None)
    assert module._default_launch(256, 8, 1, torch.float32, dev) == (32, 4, stages, False, None)
    assert module._default_launch(256, 8, 1, bf16, dev, head_dim=256) == \
        (64, 4, stages, False, None)
    assert module._default_launch(64, 8, 1, bf16, dev, fp8, head_dim=256) == \
        (128, 4, stages, False, None)
    assert module._default_launch(64, 8, 1, bf16, dev) == (64, 4, stages, False, None)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2), (12, 4), (16, 2)])
@pytest.mark.parametrize("sliding_window,logit_softcap", [(None, None), (10, None),
                                                          (None, 5.0)])
def test_decode_key_rows(num_splits, num_heads, num_kv_heads, sliding_window, logit_softcap):
    """The transposed products (keys as the MMA's rows, the GQA group as its columns: groups
    of 1, 3 padded to 4, 4 and 8) against the reference."""
    seq_lens = [1, 17, 50]
    key_cache, value_cache, block_tables, seq = make_paged_kv(
        seq_lens, num_kv_heads, 32, 16, torch.float32, DEVICE)
    query = torch.randn(len(seq_lens), num_heads, 32, device=DEVICE)
    if logit_softcap is not None:
        query = query * 8
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(query, key_cache, value_cache, block_tables, seq, qsl,
                                 32 ** -0.5, sliding_window, num_splits=num_splits,
                                 logit_softcap=logit_softcap, key_rows=True)
    expected = torch_ref.paged_attention(query, key_cache, value_cache, block_tables, seq,
                                         qsl, 32 ** -0.5, sliding_window, logit_softcap)
    assert_close(out, expected, "decode attention, keys as rows", torch.float32)


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


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("batch,max_len,sliding_window,logit_softcap", [
    (1, 8191, None, None), (64, 2049, None, None), (7, 5000, 1024, None),
    (7, 5000, 1024, 50.0), (160, 700, None, None)])
def test_decode_gpu(batch, max_len, sliding_window, logit_softcap, dtype):
    """Split-KV at batch 1, one split at 64, windows and soft-capping, and at batch 160
    (1,280 programs, 7+ per SM on GPUs of up to 182 SMs) the one-warp launch."""
    seq_lens = torch.randint(1, max_len + 1, (batch,)).tolist()
    seq_lens[0] = max_len
    _check(seq_lens, 32, 8, 128, 16, dtype, torch.device("cuda"), sliding_window,
           logit_softcap=logit_softcap)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_mixed_step_layers_share_the_decode_launch(fp8):
    """A mixed step's one-query requests (first in the batch, as the runner orders them)
    through the decode kernel on three layers' caches sharing the step's ``batch_cache``:
    one launch plan, split, whose kernels after the first layer launch straight to the
    compiled kernels where ``GRIDLLM_DIRECT_LAUNCH=1`` (``kernels._launch``); every layer
    against the reference. Over an FP8 cache the Gluon kernel takes the decodes."""
    from kernels import _launch
    from kernels.paged_decode_attention import _DecodePlan
    from kernels.prefill_attention import prefill_attention

    dev = torch.device("cuda")
    seq_lens, query_lens = [2000, 900, 4000], [1, 1, 40]
    qsl = torch.tensor([0] + query_lens, device=dev).cumsum(0).to(torch.int32)
    cache = {}
    for layer in range(3):
        torch.manual_seed(layer)
        kc, vc, tables, seq = make_paged_kv(seq_lens, 8, 128, 16, torch.bfloat16, dev)
        scales = {}
        if fp8:
            kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
            scales = dict(k_scale=0.5, v_scale=2.0)
        query = torch.randn(sum(query_lens), 32, 128, device=dev, dtype=torch.bfloat16)
        out = prefill_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                max_query_len=40, batch_cache=cache, split_one_token=True,
                                one_token_prefix=2, max_seq_len=4000, **scales)
        expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                             **scales)
        assert_close(out, expected, f"mixed step, layer {layer}", torch.bfloat16,
                     scale=4 if fp8 else 1)
    (plan,) = [v for v in cache.values() if isinstance(v, _DecodePlan)]
    assert plan.num_splits > 1
    assert (plan.attend is None) == fp8
    if not fp8:
        assert (plan.attend._kernel is not None) == _launch.DIRECT_LAUNCH
    assert (plan.merge._kernel is not None) == _launch.DIRECT_LAUNCH
