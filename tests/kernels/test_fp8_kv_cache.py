"""FP8 KV cache (e4m3 and e5m2): the KV-write kernels store what the torch reference
stores, and the attention kernels read an FP8 cache as the reference does (Triton's
interpreter handles both float8 types, so these run on the CPU too).

Kernel vs reference on the same FP8 cache uses the query dtype's tolerance (the cache is
dequantized exactly); the FP8 cache vs an unquantized one uses ``FP8_KV_TOLERANCES``,
the rounding of e4m3 (3 mantissa bits: relative error up to 2^-4 per element) and e5m2
(2 bits: 2^-3).
"""

import re

import pytest
import torch

from kernels import torch_ref
from kernels.fp8 import FP8_DTYPE, FP8_KV_DTYPES, quantize_fp8
from kernels.kv_cache_write import write_kv_cache
from kernels.paged_decode_attention import kv_words, paged_decode_attention
from kernels.prefill_attention import prefill_attention
from kernels.rotary_kv_cache_write import rotary_kv_cache_write
from tests.kernels.conftest import (
    DEVICE,
    SMALL_DTYPES,
    assert_close,
    make_paged_kv,
    needs_gpu,
    poisoned_allocations,
)
from tests.kernels.test_rotary import _cos_sin_cache

# (atol, rtol) of attention over an FP8 cache against the same inputs unquantized, by
# cache and query dtype.
FP8_KV_TOLERANCES = {
    torch.float8_e4m3fn: {torch.float32: (6e-2, 6e-2), torch.float16: (6e-2, 6e-2),
                          torch.bfloat16: (8e-2, 8e-2)},
    torch.float8_e5m2: {torch.float32: (1.2e-1, 1.2e-1), torch.float16: (1.2e-1, 1.2e-1),
                        torch.bfloat16: (1.4e-1, 1.4e-1)}}
SCALES = [(1.0, 1.0), (0.05, 2.0)]


def _assert_fp8_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal FP8 values (both round to nearest even; -0 equals 0); prints the mismatch
    count."""
    a, e = actual.cpu().float(), expected.cpu().float()
    bad = int((a != e).sum())
    if bad:
        msg = f"{name}: {bad}/{a.numel()} FP8 elements differ"
        print(msg)
        pytest.fail(msg)


def _fp8_cache(seq_lens, num_kv_heads, head_dim, k_scale, v_scale,
               cache_dtype: torch.dtype = FP8_DTYPE):
    key_cache, value_cache, block_tables, seq = make_paged_kv(
        seq_lens, num_kv_heads, head_dim, 16, torch.float32, DEVICE)
    return (quantize_fp8(key_cache * k_scale, k_scale, cache_dtype),
            quantize_fp8(value_cache * v_scale, v_scale, cache_dtype), block_tables, seq)


@pytest.mark.parametrize("cache_dtype", FP8_KV_DTYPES)
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_kv_write_matches_reference(dtype, k_scale, v_scale, cache_dtype):
    num_tokens, num_heads, head_dim = 7, 3, 40
    key = (torch.randn(num_tokens, num_heads, head_dim) * 4).to(dtype).to(DEVICE)
    value = (torch.randn(num_tokens, num_heads, head_dim) * 4).to(dtype).to(DEVICE)
    key[0, 0, :4] = torch.tensor([6e4, -6e4, 600.0, 1e-5])  # saturates, and a subnormal
    slots = torch.tensor([5, -1, 0, 17, 31, 2, 30], device=DEVICE)
    shape = (2, 16, num_heads, head_dim)
    kc, vc = (torch.zeros(shape, dtype=cache_dtype, device=DEVICE) for _ in range(2))
    ref_k, ref_v = kc.clone(), vc.clone()
    write_kv_cache(key, value, kc, vc, slots, k_scale, v_scale)
    torch_ref.write_kv_cache(key, value, ref_k, ref_v, slots, k_scale, v_scale)
    _assert_fp8_equal(kc, ref_k, "key_cache")
    _assert_fp8_equal(vc, ref_v, "value_cache")
    assert torch.isfinite(kc.float()).all()
    # Saturated at the largest finite value, not NaN or inf.
    assert float(kc.float().abs().max()) == torch.finfo(cache_dtype).max


@pytest.mark.parametrize("cache_dtype", FP8_KV_DTYPES)
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_rotary_kv_write_matches_reference(dtype, cache_dtype):
    num_tokens, num_heads, num_kv_heads, head_dim = 5, 4, 2, 32
    query = torch.randn(num_tokens, num_heads, head_dim).to(dtype).to(DEVICE)
    key = (torch.randn(num_tokens, num_kv_heads, head_dim) * 3).to(dtype).to(DEVICE)
    value = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype).to(DEVICE)
    positions = torch.tensor([0, 3, 9, 1, 20], device=DEVICE)
    slots = torch.tensor([4, 0, -1, 9, 15], device=DEVICE)
    cos_sin = _cos_sin_cache(head_dim, 32, DEVICE)
    shape = (1, 16, num_kv_heads, head_dim)
    kc, vc = (torch.zeros(shape, dtype=cache_dtype, device=DEVICE) for _ in range(2))
    ref_k, ref_v = kc.clone(), vc.clone()
    q_ref, k_rot = torch_ref.rotary_embedding(positions, query.clone(), key, cos_sin, True)
    torch_ref.write_kv_cache(k_rot, value, ref_k, ref_v, slots, 0.5, 0.25)
    rotary_kv_cache_write(positions, query, key, value, kc, vc, slots, cos_sin, True,
                          k_scale=0.5, v_scale=0.25)
    assert_close(query, q_ref, "query", dtype)
    _assert_fp8_equal(kc, ref_k, "key_cache")
    _assert_fp8_equal(vc, ref_v, "value_cache")


@pytest.mark.parametrize("cache_dtype", FP8_KV_DTYPES)
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_reads_fp8_cache(dtype, k_scale, v_scale, num_splits, cache_dtype):
    seq_lens = [1, 17, 40]
    kc, vc, tables, seq = _fp8_cache(seq_lens, 2, 32, k_scale, v_scale, cache_dtype)
    query = torch.randn(len(seq_lens), 4, 32).to(dtype).to(DEVICE)
    with poisoned_allocations():
        out = paged_decode_attention(query, kc, vc, tables, seq, None, 0.2,
                                     num_splits=num_splits, k_scale=k_scale, v_scale=v_scale)
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 0.2,
                                         k_scale=k_scale, v_scale=v_scale)
    assert_close(out, expected, "decode attention over an FP8 cache", dtype)


@pytest.mark.parametrize("cache_dtype", FP8_KV_DTYPES)
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_prefill_reads_fp8_cache(dtype, k_scale, v_scale, cache_dtype):
    seq_lens, query_lens = [20, 5, 33], [20, 1, 9]
    kc, vc, tables, seq = _fp8_cache(seq_lens, 2, 32, k_scale, v_scale, cache_dtype)
    qsl = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32).to(DEVICE)
    query = torch.randn(sum(query_lens), 4, 32).to(dtype).to(DEVICE)
    with poisoned_allocations():
        out = prefill_attention(query, kc, vc, tables, seq, qsl, 0.2, sliding_window=12,
                                k_scale=k_scale, v_scale=v_scale)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 0.2,
                                         sliding_window=12, k_scale=k_scale, v_scale=v_scale)
    assert_close(out, expected, "prefill attention over an FP8 cache", dtype)


@pytest.mark.parametrize("cache_dtype", FP8_KV_DTYPES)
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_fp8_cache_stays_close_to_unquantized(dtype, cache_dtype):
    """The quantization error itself: an FP8 cache vs the cache it was quantized from
    (fixed data: the tolerance bounds this draw's error, not every draw's)."""
    torch.manual_seed(0)
    seq_lens = [9, 30]
    key_cache, value_cache, tables, seq = make_paged_kv(seq_lens, 2, 32, 16, dtype, DEVICE)
    kc, vc = (quantize_fp8(key_cache, 1.0, cache_dtype),
              quantize_fp8(value_cache, 1.0, cache_dtype))
    query = torch.randn(len(seq_lens), 4, 32).to(dtype).to(DEVICE)
    exact = paged_decode_attention(query, key_cache, value_cache, tables, seq, None, 0.2)
    out = paged_decode_attention(query, kc, vc, tables, seq, None, 0.2)
    atol, rtol = FP8_KV_TOLERANCES[cache_dtype][dtype]
    diff = (out.float() - exact.float()).abs()
    assert bool(torch.isclose(out.float(), exact.float(), atol=atol, rtol=rtol).all()), \
        f"max |diff| {float(diff.max()):g}"
    assert float(diff.max()) > 0  # the cache was quantized


def test_cache_words_only_on_cuda_under_bfloat16_queries():
    """The word path (inline PTX) never runs in the CPU interpreter or for other caches."""
    kc, vc, _, _ = _fp8_cache([17], 2, 32, 1.0, 1.0)
    query = torch.randn(1, 4, 32).to(torch.bfloat16).to(DEVICE)
    assert kv_words(kc, vc, query, 32) == (DEVICE.type == "cuda")
    assert not kv_words(kc, vc, query.float(), 32)
    assert not kv_words(kc.to(query.dtype), vc.to(query.dtype), query, 32)
    # A key cache that starts off a word boundary keeps both tiles on bytes.
    shifted = torch.zeros(kc.numel() + 1, dtype=kc.dtype, device=DEVICE)[1:].view(kc.shape)
    assert not kv_words(shifted, vc, query, 32)


def test_bad_scales_and_dtypes_are_named():
    kc, vc, tables, seq = _fp8_cache([5], 1, 16, 1.0, 1.0)
    query = torch.randn(1, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="k_scale"):
        paged_decode_attention(query, kc, vc, tables, seq, None, 0.2, k_scale=0.0)
    with pytest.raises(ValueError, match="v_scale"):
        write_kv_cache(query, query, kc, vc, torch.zeros(1, dtype=torch.long, device=DEVICE),
                       v_scale=-1.0)
    with pytest.raises(ValueError, match="value_cache"):
        paged_decode_attention(query, kc, vc.float(), tables, seq, None, 0.2)


@pytest.mark.parametrize("cache_dtype", FP8_KV_DTYPES)
def test_kv_write_rounds_like_torch_across_the_range(cache_dtype):
    """Every binade, subnormals, ties and saturation: the kernel's rounding is torch's
    (round to nearest even, saturating at +-448 for e4m3, +-57344 for e5m2)."""
    limit = torch.finfo(cache_dtype).max
    top = float(torch.log10(torch.tensor(limit)))
    sweep = torch.cat([torch.linspace(-1.1 * limit, 1.1 * limit, 8001),
                       torch.linspace(-500, 500, 8001), torch.logspace(-12, top, 2000),
                       -torch.logspace(-12, top, 2000)])
    sweep = torch.cat([sweep, torch.zeros(-sweep.numel() % 40)]).view(-1, 1, 40).to(DEVICE)
    shape = (sweep.shape[0], 1, 1, 40)
    kc, vc = (torch.zeros(shape, dtype=cache_dtype, device=DEVICE) for _ in range(2))
    write_kv_cache(sweep, sweep, kc, vc, torch.arange(sweep.shape[0], device=DEVICE))
    _assert_fp8_equal(kc.view(sweep.shape), sweep.clamp(-limit, limit).to(cache_dtype),
                      "rounded sweep")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("batch,launch", [(160, {}), (160, dict(max_registers=168)),
                                          (256, dict(block_n=16, max_registers=128))])
def test_fp8_cache_one_warp_launch(batch, launch):
    """Batch 160 and 256 x 8 KV heads over an FP8 cache (7+ programs per SM on GPUs of up
    to 182 SMs): the one-warp launch, as compiled and with the register caps that
    ``_default_launch`` takes past 8 programs per SM, against the reference (the
    ``tl.dot`` kernel: by default the Gluon kernel takes these batches)."""
    import kernels.paged_decode_attention as module

    seq_lens = torch.randint(1, 701, (batch,)).tolist()
    kc, vc, tables, seq = _fp8_cache(seq_lens, 8, 128, 0.5, 0.25)
    query = torch.randn(len(seq_lens), 32, 128, device=DEVICE).to(torch.bfloat16)
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    assert module._default_launch(batch, 8, 1, query.dtype, DEVICE, kc.dtype)[1] == 1
    out = paged_decode_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                 max_seq_len=max(seq_lens), k_scale=0.5, v_scale=0.25,
                                 gluon=False, **launch)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                         k_scale=0.5, v_scale=0.25)
    assert_close(out, expected, "decode attention, FP8 cache, one warp", torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 8), (8, 8), (64, 8), (24, 8)])
def test_fp8_cache_split_kv_key_rows(num_heads, num_kv_heads):
    """Split-KV over an FP8 cache under bfloat16 queries: the ``tl.dot`` kernel's default
    launch takes the transposed products (``key_rows``; GQA groups of 4, 1, 8 and 3), and
    so does the default path, the Gluon kernel, at its own split count: both against the
    reference."""
    import kernels.paged_decode_attention as module

    seq_lens = [8192, 3000, 1, 5000]
    kc, vc, tables, seq = _fp8_cache(seq_lens, num_kv_heads, 128, 0.5, 0.25)
    query = torch.randn(len(seq_lens), num_heads, 128, device=DEVICE).to(torch.bfloat16)
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    splits = module.pick_num_splits(len(seq_lens), num_kv_heads, 8192, DEVICE)
    assert splits > 1
    assert module._default_launch(len(seq_lens), num_kv_heads, splits, query.dtype, DEVICE,
                                  kc.dtype)[3]
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                         k_scale=0.5, v_scale=0.25)
    for gluon in (False, None):
        out = paged_decode_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                     max_seq_len=8192, k_scale=0.5, v_scale=0.25, gluon=gluon)
        assert_close(out, expected, f"decode attention, FP8 cache, gluon={gluon}",
                     torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_splits", [None, 1])
def test_fp8_cache_at_llama3_8b_shapes(num_splits):
    """Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128), bf16 queries over an
    FP8 cache: decode (split-KV heuristic and one split) and a prefill chunk after a prefix."""
    seq_lens = [1000, 4096, 37]
    kc, vc, tables, seq = _fp8_cache(seq_lens, 8, 128, 0.5, 0.25)
    query = torch.randn(len(seq_lens), 32, 128, device=DEVICE).to(torch.bfloat16)
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    assert kv_words(kc, vc, query, 128)  # the key and value tiles are read as words here
    out = paged_decode_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                 num_splits=num_splits, k_scale=0.5, v_scale=0.25)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                         k_scale=0.5, v_scale=0.25)
    assert_close(out, expected, "decode attention, FP8 cache", torch.bfloat16)
    query_lens = [512, 256, 37]
    qsl = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32).to(DEVICE)
    query = torch.randn(sum(query_lens), 32, 128, device=DEVICE).to(torch.bfloat16)
    out = prefill_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5, k_scale=0.5,
                            v_scale=0.25)
    expected = torch_ref.paged_attention(query, kc, vc, tables, seq, qsl, 128 ** -0.5,
                                         k_scale=0.5, v_scale=0.25)
    assert_close(out, expected, "prefill attention, FP8 cache", torch.bfloat16)


@pytest.mark.sm90
@pytest.mark.parametrize("cache_dtype,cvt", [("fp8e4nv", "e4m3x2"), ("fp8e5", "e5m2x2")])
def test_each_fp8_format_compiles_for_sm90_to_its_own_conversions(cache_dtype, cvt):
    """Without a GPU: the KV write stores each format with its own saturating conversion
    (``store_cache`` picks e4m3's or e5m2's range and rounding by the cache pointer's
    type), and decode attention over it converts pairs of that format to float16 for the
    products (ptxas runs on both)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from tests.kernels.sm90_ptx import compile_triton_for_sm90

    write = compile_triton_for_sm90(
        "kernels.kv_cache_write", "_kv_cache_write_kernel",
        dict(k_ptr="*bf16", v_ptr="*bf16", kc_ptr=f"*{cache_dtype}", vc_ptr=f"*{cache_dtype}",
             slot_ptr="*i64", k_inv_scale="fp32", v_inv_scale="fp32"),
        dict(BLOCK_H=8, BLOCK_D=128, IS_FP8=True))
    assert set(re.findall(r"cvt\.rn\.satfinite\.(\w+)\.f32", write)) == {cvt}
    decode = compile_triton_for_sm90(
        "kernels.paged_decode_attention", "_paged_decode_attention_kernel",
        dict(q_ptr="*bf16", kc_ptr=f"*{cache_dtype}", vc_ptr=f"*{cache_dtype}", bt_ptr="*i32",
             seq_lens_ptr="*i32", out_ptr="*bf16", part_acc_ptr="*fp32", part_ml_ptr="*fp32",
             scale_log2="fp32", softcap_mul="fp32", softcap_log2="fp32", v_scale="fp32"),
        dict(GROUP=4, BLOCK_G=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, NUM_SPLITS=64,
             HAS_WINDOW=False, HAS_SOFTCAP=False, DOT_PRECISION="ieee", IS_STRIDED=False,
             USE_GDC=False, F16_DOTS=True, BLOCK_SIZE=16, KV_WORDS=False,
             PREFETCH_TABLE=False, KEY_ROWS=True),
        options={"num_warps": 2, "num_stages": 3})
    assert set(re.findall(r"cvt\.rn\.f16x2\.(e\dm\dx2)", decode)) == {cvt}
    assert "mma.sync" in decode
