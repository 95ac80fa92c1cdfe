"""The Gluon decode attention over an FP8 cache (``kernels.fp8_decode_attention``): against
the torch reference on the GPU, what it declines, and, compiled for sm_90 on any machine,
that its loop keeps the tiles out of shared memory between their copy and the MMA."""

import re

import pytest
import torch

from kernels import fp8_decode_attention as gluon_fp8
from kernels import torch_ref
from kernels.fp8 import quantize_fp8
from kernels.paged_decode_attention import paged_decode_attention
from tests.kernels.conftest import (
    DEVICE,
    assert_close,
    make_paged_kv,
    needs_gpu,
    poisoned_allocations,
)
from tests.kernels.sm90_ptx import compile_for_sm90, loop_body


def _fp8_cache(seq_lens, num_kv_heads, block_size, device, k_scale=0.5, v_scale=0.25):
    key_cache, value_cache, block_tables, seq = make_paged_kv(
        seq_lens, num_kv_heads, 128, block_size, torch.float32, device)
    return (quantize_fp8(key_cache * k_scale, k_scale),
            quantize_fp8(value_cache * v_scale, v_scale), block_tables, seq)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads,block_size", [
    (32, 8, 16), (8, 8, 16), (64, 8, 16), (24, 8, 16), (128, 8, 32), (32, 8, 64), (16, 4, 48)])
@pytest.mark.parametrize("block_n,stages", [(16, 2), (32, 2), (16, 4), (32, 3), (64, 2)])
def test_matches_reference(dtype, num_heads, num_kv_heads, block_size, block_n, stages):
    """GQA groups of 4, 1, 8, 3 and 16; cache blocks of 16, 32, 48 and 64 (tiles across
    blocks and within them); ragged lengths with a padding row (length 0: zeros), a
    length of one, partial last tiles; each launch against the reference."""
    seq_lens = [0, 1, 15, 16, 17, 100, 333, 1000]
    kc, vc, tables, seq = _fp8_cache(seq_lens, num_kv_heads, block_size, DEVICE)
    query = torch.randn(len(seq_lens), num_heads, 128, device=DEVICE).to(dtype)
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    assert gluon_fp8.serves(query, kc, vc, None, None, None)
    with poisoned_allocations():
        out = paged_decode_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                     num_splits=1, k_scale=0.5, v_scale=0.25, gluon=True,
                                     block_n=block_n, num_stages=stages)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                         k_scale=0.5, v_scale=0.25)
    assert_close(out, expected, "Gluon decode attention, FP8 cache", dtype)
    assert out[0].abs().max().item() == 0.0


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_splits", [2, 7, 64])
@pytest.mark.parametrize("block_n", [16, 32])
def test_split_kv_matches_reference(num_splits, block_n):
    """Split-KV: each split's partial results merged by ``paged_decode_attention``'s merge
    kernel; contexts shorter than the splits (empty splits), a padding row, 8k keys."""
    seq_lens = [0, 1, 40, 1000, 8192]
    kc, vc, tables, seq = _fp8_cache(seq_lens, 8, 16, DEVICE)
    query = torch.randn(len(seq_lens), 32, 128, device=DEVICE).to(torch.bfloat16)
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    with poisoned_allocations():
        out = paged_decode_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                     num_splits=num_splits, k_scale=0.5, v_scale=0.25,
                                     gluon=True, block_n=block_n)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                         k_scale=0.5, v_scale=0.25)
    assert_close(out, expected, "Gluon split-KV decode attention", torch.bfloat16)
    assert out[0].abs().max().item() == 0.0


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("use_gdc", [False, True])
@pytest.mark.parametrize("batch", [64, 160, 256])
def test_default_launch_at_llama3_8b_shapes(batch, use_gdc):
    """Batch 64, 160 and 256 x 8 KV heads (the launches ``default_launch`` picks on GPUs of
    up to 182 SMs), with and without programmatic dependent launch, inside a CUDA graph as
    decode runs: the default path takes the kernel and matches the reference."""
    seq_lens = torch.randint(1, 1200, (batch,)).tolist()
    kc, vc, tables, seq = _fp8_cache(seq_lens, 8, 16, DEVICE)
    query = torch.randn(batch, 32, 128, device=DEVICE).to(torch.bfloat16)
    out = torch.empty_like(query)
    block_n, stages = gluon_fp8.default_launch(
        batch * 8, 1, torch.cuda.get_device_properties(DEVICE).multi_processor_count)
    scale_log2 = 128 ** -0.5 * 0.5 * 1.4426950408889634

    def launch():
        gluon_fp8.fp8_decode_attention(query, kc, vc, tables, seq, out, scale_log2, 0.25,
                                       block_n, stages, use_gdc)

    launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                         k_scale=0.5, v_scale=0.25)
    assert_close(out, expected, "Gluon decode attention in a graph", torch.bfloat16)
    default = paged_decode_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                     k_scale=0.5, v_scale=0.25)
    torch.testing.assert_close(default, out, atol=0, rtol=0)


def test_declines_what_it_does_not_run():
    """Where the kernel cannot run, ``serves`` says no and ``gluon=True`` is refused with
    what it needs; the default then takes the ``tl.dot`` kernel."""
    seq_lens = [5, 40]
    kc, vc, tables, seq = _fp8_cache(seq_lens, 2, 16, DEVICE)
    query = torch.randn(2, 4, 128).to(torch.bfloat16).to(DEVICE)
    on_gpu = DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) >= (9, 0)
    assert gluon_fp8.serves(query, kc, vc, None, None, None) == (
        on_gpu and gluon_fp8.gluon is not None)
    for case in (dict(sliding_window=8), dict(logit_softcap=30.0), dict(attention_stride=4)):
        assert not gluon_fp8.serves(query, kc, vc, case.get("sliding_window"),
                                    case.get("logit_softcap"), case.get("attention_stride"))
        with pytest.raises(ValueError, match="gluon=True needs an FP8 cache"):
            paged_decode_attention(query, kc, vc, tables, seq, None, 0.1, gluon=True, **case)
    wide = torch.randn(2, 4, 64).to(torch.bfloat16).to(DEVICE)  # head dim 64
    kc64, vc64 = kc[..., :64].contiguous(), vc[..., :64].contiguous()
    assert not gluon_fp8.serves(wide, kc64, vc64, None, None, None)
    bf16_cache = kc.to(torch.bfloat16)
    assert not gluon_fp8.serves(query, bf16_cache, bf16_cache, None, None, None)
    out = paged_decode_attention(query, kc, vc, tables, seq, None, 0.1, num_splits=1,
                                 gluon=False)
    qsl = torch.arange(3, dtype=torch.int32, device=DEVICE)
    assert_close(out, torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 0.1),
                 "tl.dot kernel", torch.bfloat16)


@pytest.mark.sm90
@pytest.mark.skipif(gluon_fp8.gluon is None, reason="Triton without Gluon")
@pytest.mark.parametrize("block_n,stages,early", [(16, 2, False), (32, 2, False),
                                                   (16, 2, True), (32, 3, True)])
def test_tiles_reach_the_mma_from_registers(block_n, stages, early):
    """Compiled for sm_90: every layout conversion is a relabelling (``assert_trivial`` in
    the kernel would fail the compile), and the loop moves each tile through shared memory
    once: copied in by ``cp.async``, read back as 16-byte vectors, never stored from
    registers or read by ``ldmatrix``; 16 MMAs for Q K^T and 16 for P V per 16 keys, one
    e4m3 pair conversion per two bytes."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    body = loop_body(compile_for_sm90(
        "kernels.fp8_decode_attention", "_fp8_decode_attention_kernel", block_n,
        dict(q_ptr="*bf16", kc_ptr="*fp8e4nv", vc_ptr="*fp8e4nv", bt_ptr="*i32",
             seq_lens_ptr="*i32", out_ptr="*bf16", part_acc_ptr="*fp32",
             part_ml_ptr="*fp32"),
        dict(GROUP=4, BLOCK_SIZE=16, BLOCK_N=block_n, STAGES=stages, NUM_SPLITS=1,
             USE_GDC=True, EARLY=early), floats=("scale_log2", "v_scale")))
    assert "st.shared" not in body and "ldmatrix" not in body
    loads = re.findall(r"ld\.shared[\w.]*", body)
    assert loads and all(".v4" in load for load in loads)
    tile_bytes = 2 * block_n * 128
    assert len(re.findall(r"cp\.async\.cg\.shared\.global.*0x10", body)) == tile_bytes // 16 // 32
    assert len(re.findall(r"ld\.shared\.v4", body)) == tile_bytes // 16 // 32
    assert len(re.findall(r"mma\.sync", body)) == 2 * block_n  # 16 + 16 per 16 keys
    assert len(re.findall(r"cvt\.rn\.f16x2\.e4m3x2", body)) == tile_bytes // 2 // 32


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_splits", [1, 4])
def test_early_reads_wait_for_the_new_key(monkeypatch, num_splits):
    """With early reads (``EARLY_READS``) the rotary KV write and decode attention launch
    behind a long kernel (a GEMV over 128 MB) and read the step's inputs and cached keys
    before they wait; the newest key's slot holds a stale value until the write, so an
    attention that read it early would differ. Lengths put the newest key in the first
    tile of its split (1-40 keys) and far from it (1,000): the output is the same bits as
    the plain launch's, and matches the reference over the written cache."""
    from kernels import paged_decode_attention as pda
    from kernels import rotary_kv_cache_write as rkv
    from kernels.gemv import gemv

    seq_lens = [1, 5, 16, 17, 40, 1000]
    stale_k, stale_v, tables, seq = _fp8_cache(seq_lens, 8, 16, DEVICE)
    batch = len(seq_lens)
    gen = torch.Generator(device="cpu").manual_seed(0)
    query = torch.randn(batch, 32, 128, generator=gen).to(DEVICE, torch.bfloat16)
    key = torch.randn(batch, 8, 128, generator=gen).to(DEVICE, torch.bfloat16)
    value = torch.randn(batch, 8, 128, generator=gen).to(DEVICE, torch.bfloat16)
    positions = (seq - 1).long()
    slots = tables.long().gather(1, (positions // 16)[:, None])[:, 0] * 16 + positions % 16
    # The slots' stale contents: far from any value the write stores.
    stale = quantize_fp8(torch.full((batch, 8, 128), 200.0, device=DEVICE), 0.5)
    stale_k.view(torch.uint8).view(-1, 8, 128)[slots] = stale.view(torch.uint8)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    freqs = torch.outer(torch.arange(1024, dtype=torch.float32), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)
    weight = torch.randn(16384, 4096, generator=gen).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, 4096, generator=gen).to(DEVICE, torch.bfloat16)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)

    def step(early: bool):
        monkeypatch.setattr(pda, "EARLY_READS", early)
        monkeypatch.setattr(rkv, "EARLY_READS", early)
        kc, vc, q = stale_k.clone(), stale_v.clone(), query.clone()
        torch.cuda.synchronize()
        gemv(x, weight)
        rkv.rotary_kv_cache_write(positions, q, key, value, kc, vc, slots, cos_sin, True,
                                  k_scale=0.5, v_scale=0.25)
        out = paged_decode_attention(q, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                     num_splits=num_splits, k_scale=0.5, v_scale=0.25,
                                     gluon=True)
        torch.cuda.synchronize()
        return out, q, kc, vc

    plain, q, kc, vc = step(False)
    for _ in range(3):
        early = step(True)[0]
        torch.testing.assert_close(early, plain, atol=0, rtol=0)
    expected = torch_ref.paged_attention(q, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                         k_scale=0.5, v_scale=0.25)
    assert_close(plain, expected, "decode attention after the rotary KV write",
                 torch.bfloat16)
