"""The decode GEMV against torch: ``x @ (W * s)^T + b`` computed in float64 from the same
weight.

Tolerance per element: the dtype's (atol, rtol) for the output's rounding, plus float32
accumulation error, which grows with the sum of the terms' magnitudes (``|x| @ |W s|^T``),
not with the result."""

import re

import pytest
import torch

from kernels.fp8 import FP8_DTYPE
from kernels.gemv import MAX_ROWS, config_for, gemv, rms_norm_gemv, split_k_for
from tests.kernels.conftest import (
    DEVICE,
    GPU_DTYPES,
    SMALL_DTYPES,
    TOLERANCES,
    assert_close,
    needs_gpu,
)

# Relative float32 accumulation error allowed against the sum of |terms| (16 ulps).
ACCUMULATION_EPS = 2.0 ** -20


def _operands(num_rows, num_out, num_in, dtype, weight_dtype, device, has_bias, has_scale):
    torch.manual_seed(num_rows * 131 + num_out + num_in)
    weight = torch.randn(num_out, num_in) * torch.logspace(-2, 1, num_out)[:, None]
    scale = None
    if weight_dtype == FP8_DTYPE:
        scale = (weight.abs().amax(-1) / 448.0).float()
        weight = (weight / scale[:, None]).clamp(-448, 448).to(FP8_DTYPE)
        if not has_scale:
            scale = None
    else:
        weight = weight.to(weight_dtype)
        if has_scale:
            scale = torch.rand(num_out) + 0.5
    x = torch.randn(num_rows, num_in).to(dtype)
    bias = torch.randn(num_out).to(dtype) if has_bias else None
    w = weight.double() * (1.0 if scale is None else scale.double()[:, None])
    expected = x.double() @ w.t()
    if has_bias:
        expected += bias.double()
    magnitude = x.double().abs() @ w.abs().t()
    to = (lambda t: None if t is None else t.to(device))
    return to(x), to(weight), to(scale), to(bias), (expected, magnitude)


def _check(num_rows, num_out, num_in, dtype, device, *, weight_dtype=None, has_bias=False,
           has_scale=False, config=None):
    x, w, s, b, (expected, magnitude) = _operands(
        num_rows, num_out, num_in, dtype, weight_dtype or dtype, device, has_bias, has_scale)
    kwargs = {} if config is None else {"config": config}
    out = gemv(x, w, b, s, **kwargs)
    assert out.dtype == dtype and out.shape == (num_rows, num_out)
    atol, rtol = TOLERANCES[dtype]
    error = (out.double().cpu() - expected).abs()
    bound = atol + rtol * expected.abs() + ACCUMULATION_EPS * magnitude
    bad = error > bound
    assert not bool(bad.any()), (f"{int(bad.sum())}/{bad.numel()} outside the bound; worst "
                                 f"{float((error / bound).max()):.2f}x the bound")
    return out


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("num_rows,num_out,num_in,has_bias,has_scale",
                         [(1, 64, 256, False, False), (2, 30, 1100, True, False),
                          (3, 37, 300, False, True), (MAX_ROWS, 48, 512, True, True)])
def test_matches_torch(num_rows, num_out, num_in, has_bias, has_scale, dtype):
    """Every row count, ragged N and K (a masked last tile), bias and scale."""
    _check(num_rows, num_out, num_in, dtype, DEVICE, has_bias=has_bias, has_scale=has_scale,
           config=(16, 128, 4, 1, 1))


@pytest.mark.parametrize("num_rows", [1, 3])
def test_fp8_weight_matches_torch(num_rows):
    """e4m3 weights with per-channel scales, as quantization="fp8" stores them."""
    _check(num_rows, 40, 384, torch.float32, DEVICE, weight_dtype=FP8_DTYPE, has_scale=True,
           has_bias=True, config=(16, 128, 4, 1, 1))


@pytest.mark.parametrize("num_out,num_in,config", [
    (40, 384, (16, 128, 4, 1, 1)), (37, 300, (16, 128, 4, 1, 1)), (70, 512, (16, 64, 4, 1, 3)),
    (33, 1000, (8, 256, 4, 1, 2))])
def test_fp8_words_match_torch(num_out, num_in, config):
    """One bfloat16 row and an e4m3 weight: the kernel that reads both as words (ragged N,
    a masked last tile, split K)."""
    from kernels.gemv import _reads_words

    x, w, _, _, _ = _operands(1, num_out, num_in, torch.bfloat16, FP8_DTYPE, DEVICE, False,
                              True)
    assert _reads_words(x, w, x, x, num_in)
    _check(1, num_out, num_in, torch.bfloat16, DEVICE, weight_dtype=FP8_DTYPE, has_scale=True,
           has_bias=True, config=config)


def test_fp8_words_only_where_every_word_is_whole():
    """The word kernel takes one bfloat16 row of whole, aligned words and an e4m3 weight
    with scales; anything else runs the element kernel (same values)."""
    from kernels.gemv import _reads_words

    x, w, s, _, _ = _operands(1, 24, 256, torch.bfloat16, FP8_DTYPE, DEVICE, False, True)
    assert _reads_words(x, w, x, x, 256)
    wide = torch.zeros(1, 258, dtype=torch.bfloat16, device=DEVICE)
    wide[:, 2:] = x
    shifted = wide[:, 2:]  # 4 bytes past an 8-byte boundary
    assert not _reads_words(shifted, w, shifted, shifted, 256)
    assert not _reads_words(x.float(), w, x, x, 256)
    assert not _reads_words(x[:, :254].contiguous(), w[:, :254].contiguous(), x, x, 254)
    config = (16, 128, 4, 1, 1)
    assert_close(gemv(shifted, w, None, s, config=config), gemv(x, w, None, s, config=config),
                 "element kernel against word kernel", torch.bfloat16)


def test_fp8_words_read_every_e4m3_value_exactly():
    """Every finite e4m3 value (subnormals, zeros, +-448) at every byte of a word: row r of
    the weight is the 256 codes rotated by r, and x picks one element k (unit scales), so
    output r is the code at (r, k), exactly (every e4m3 value is a bfloat16)."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F] + [0, 0x80],
                         dtype=torch.uint8)
    weight = torch.stack([codes.roll(r) for r in range(256)]).view(FP8_DTYPE)
    scale = torch.ones(256, device=DEVICE)
    for k in range(4):
        x = torch.zeros(1, 256, dtype=torch.bfloat16)
        x[0, k] = 1.0
        out = gemv(x.to(DEVICE), weight.to(DEVICE), None, scale, config=(16, 128, 4, 1, 1))
        assert torch.equal(out.cpu()[0], weight[:, k].to(torch.bfloat16)), f"byte {k}"


@pytest.mark.parametrize("split_k,num_in", [(2, 512), (3, 600), (4, 256)])
def test_split_k_matches_torch_and_repeats_exactly(split_k, num_in):
    """K spread over programs (whole tiles, a short last split, splits left empty): the same
    values, bit for bit on a second launch (partials added in split order), and the counters
    are left at zero for the next launch."""
    config = (16, 64, 4, 1, split_k)
    first = _check(2, 70, num_in, torch.float32, DEVICE, has_bias=True, config=config)
    second = _check(2, 70, num_in, torch.float32, DEVICE, has_bias=True, config=config)
    assert torch.equal(first, second)
    from kernels._utils import split_k_counters

    assert int(split_k_counters(torch.device(DEVICE)).abs().sum()) == 0


def test_split_count_follows_the_shape():
    """Few column blocks get more splits (bounded by two tiles of K each); many get one."""
    device = torch.device("cpu")
    assert split_k_for(4096, 4096, 8, 512, device) == 1  # 512 blocks: enough programs
    assert split_k_for(64, 4096, 8, 512, device) == 2  # 8 blocks, at most 4096 / 1024
    assert split_k_for(64, 512, 8, 512, device) == 1  # not two tiles of K to share


def test_empty_k_gives_the_bias():
    x = torch.zeros(2, 0, device=DEVICE)
    w = torch.zeros(5, 0, device=DEVICE)
    b = torch.arange(5.0, device=DEVICE)
    assert torch.equal(gemv(x, w, b).cpu(), b.cpu().expand(2, 5))
    assert torch.equal(gemv(x, w).cpu(), torch.zeros(2, 5))


def test_rejects_what_it_cannot_read():
    x = torch.zeros(2, 64, device=DEVICE)
    w = torch.zeros(32, 64, device=DEVICE)
    with pytest.raises(ValueError, match="x must have 1 to"):
        gemv(torch.zeros(MAX_ROWS + 1, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match="x must have 1 to"):
        gemv(torch.zeros(0, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match="weight must have dtype"):
        gemv(x, w.to(torch.int8))
    with pytest.raises(ValueError, match="weight must have shape"):
        gemv(x[:, :32].contiguous(), w)
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        gemv(x, w, weight_scale=torch.ones(16, device=DEVICE))
    with pytest.raises(ValueError, match="bias must have shape"):
        gemv(x, w, torch.ones(16, device=DEVICE))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_rows", list(range(1, MAX_ROWS + 1)))
@pytest.mark.parametrize("num_out,num_in", [(6144, 4096), (4096, 14336), (1000, 4000)])
def test_decoder_shapes_on_gpu(num_rows, num_out, num_in, dtype):
    """Llama-3-8B's q/k/v and down shapes and a ragged one, in the default configuration
    (split count from the SMs)."""
    _check(num_rows, num_out, num_in, dtype, "cuda", has_bias=num_rows == 2)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_rows", [1, 4])
def test_fp8_decoder_shape_on_gpu(num_rows):
    _check(num_rows, 6144, 4096, torch.bfloat16, "cuda", weight_dtype=FP8_DTYPE,
           has_scale=True)



# The float16-pair kernel's lanes chain 8 products in float16: at most 8 roundings of 2^-11
# of a partial sum no larger than the terms' sum (``fma.rn``), one more for the product in
# Triton's interpreter (a multiply, then an add); and they lose what x's values under
# float16's normal range (2^-14 of x's largest, once scaled) keep below 2^-24 of it.
F16_CHAIN_EPS = 9 * 2.0 ** -11
F16_SUBNORMAL_EPS = 2.0 ** -24


def _check_f16_pairs(num_out, num_in, config, outlier, device, silu=True):
    """The float16-pair kernel against float64, within F16_CHAIN_EPS / F16_SUBNORMAL_EPS
    of the terms; through the SiLU-and-mul epilogue the same bits; twice the same bits."""
    from kernels.silu_and_mul import silu_and_mul

    x, w, s, b, _ = _operands(1, num_out, num_in, torch.bfloat16, FP8_DTYPE, device, True,
                              True)
    if outlier:
        x[0, 7] = 1000.0
    out = gemv(x, w, b, s, config=config, f16_pairs=True)
    assert out.dtype == torch.bfloat16 and out.shape == (1, num_out)
    ws = w.double().cpu() * s.double().cpu()[:, None]
    expected = x.double().cpu() @ ws.t() + b.double().cpu()
    magnitude = x.double().cpu().abs() @ ws.abs().t()
    atol, rtol = TOLERANCES[torch.bfloat16]
    bound = (atol + rtol * expected.abs() + F16_CHAIN_EPS * magnitude
             + F16_SUBNORMAL_EPS * float(x.abs().max()) * ws.abs().sum(1))
    error = (out.double().cpu() - expected).abs()
    assert not bool((error > bound).any()), f"worst {float((error / bound).max()):.2f}x"
    if silu and num_out % 2 == 0:
        fused = gemv(x, w, b, s, config=config, silu_out=True, f16_pairs=True)
        assert torch.equal(fused, silu_and_mul(out))
    assert torch.equal(out, gemv(x, w, b, s, config=config, f16_pairs=True))


@pytest.mark.parametrize("num_out,num_in,config,outlier", [
    (40, 384, (16, 128, 4, 1, 1), False), (37, 1000, (8, 256, 4, 1, 2), False),
    (70, 4096, (16, 64, 4, 1, 3), False), (48, 4096, (16, 128, 4, 1, 2), False),
    (33, 2048, (8, 128, 4, 1, 1), True)])
def test_fp8_f16_pairs_match_torch(num_out, num_in, config, outlier):
    """One bfloat16 row and an e4m3 weight with products in float16 pairs: ragged N, whole
    groups of tiles and a masked last one, split K, several chains a program; an x element
    1,000 times the others (its word position's scale follows it, the rest of that
    position's values drop toward float16's subnormals)."""
    _check_f16_pairs(num_out, num_in, config, outlier, DEVICE)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_out,num_in", [(6144, 4096), (4096, 14336), (28672, 4096),
                                            (1000, 4000)])
def test_fp8_f16_pairs_at_decoder_shapes_on_gpu(num_out, num_in):
    """The float16-pair kernel's PTX (``cvt.rn.f16x2.e4m3x2``, ``fma.rn.f16x2``) at
    Llama-3-8B's shapes with the launches ``config_for`` picks, and a ragged one."""
    _check_f16_pairs(num_out, num_in, None, False, "cuda")
    _check_f16_pairs(num_out, num_in, None, True, "cuda", silu=False)


@pytest.mark.sm90
def test_fp8_f16_pairs_compile_for_sm90_to_paired_float16_products():
    """Without a GPU: the kernel's inline PTX assembles for sm_90 (ptxas runs), and its
    loop over a group of four tiles holds, per weight word of a thread, two e4m3 pair
    conversions and two paired products (4 channels x 4 words x 4 tiles), no scalar
    float16 arithmetic, and no masked load but the next group's first weight tile's (two
    8-byte loads a channel)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from tests.kernels.sm90_ptx import compile_triton_for_sm90, loop_body

    ptx = compile_triton_for_sm90(
        "kernels.gemv", "_gemv_e4m3_f16_kernel",
        dict(x_ptr="*bf16", w_ptr="*fp8e4nv", scale_ptr="*fp32", bias_ptr="*bf16",
             y_ptr="*bf16", partial_ptr="*fp32", lock_ptr="*i32"),
        dict(HAS_BIAS=False, BLOCK_N=4, BLOCK_K=1024, SPLIT_K=1, EVEN_K=True,
             SILU_OUT=False, ASM=True, USE_GDC=False),
        aligned=("num_in", "stride_w"), options={"num_warps": 2})
    body = loop_body(ptx, "fma.rn.f16x2")
    words = 4 * 4 * 4  # channels x words a thread x tiles
    assert body.count("cvt.rn.f16x2.e4m3x2") == 2 * words
    assert body.count("fma.rn.f16x2") == 2 * words
    assert "fma.rn.f16 " not in body and "mul.f16 " not in body
    masked = re.findall(r"^\s*@!?%p\d+\s+ld\.global", body, re.M)
    assert len(masked) == 2 * 4


def test_fp8_f16_pairs_of_a_zero_row_are_the_bias():
    x = torch.zeros(1, 256, dtype=torch.bfloat16, device=DEVICE)
    w = torch.ones(8, 256, device=DEVICE).to(FP8_DTYPE)
    b = torch.arange(8.0, device=DEVICE).to(torch.bfloat16)
    out = gemv(x, w, b, torch.ones(8, device=DEVICE), config=(8, 128, 4, 1, 1),
               f16_pairs=True)
    assert torch.equal(out[0], b)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("num_rows,half,num_in,has_bias,split_k",
                         [(1, 40, 256, False, 1), (3, 37, 300, True, 1), (2, 24, 512, True, 3)])
def test_silu_out_equals_silu_and_mul_of_the_product(num_rows, half, num_in, has_bias,
                                                      split_k, dtype):
    """``silu_out``: the gate/up projection's product through the SiLU-and-mul kernel, the
    same bits (each program takes gate and up channels in pairs, the last pair past the
    end masked)."""
    from kernels.silu_and_mul import silu_and_mul

    torch.manual_seed(num_in + half)
    x = torch.randn(num_rows, num_in, device=DEVICE).to(dtype)
    w = torch.randn(2 * half, num_in, device=DEVICE).to(dtype)
    b = torch.randn(2 * half, device=DEVICE).to(dtype) if has_bias else None
    config = (16, 128, 4, 1, split_k)
    out = gemv(x, w, b, config=config, silu_out=True)
    assert out.shape == (num_rows, half)
    assert torch.equal(out, silu_and_mul(gemv(x, w, b, config=config)))


def test_silu_out_rejects_an_odd_weight():
    x = torch.zeros(1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="even number of rows"):
        gemv(x, torch.zeros(9, 64, device=DEVICE), silu_out=True)
    with pytest.raises(ValueError, match="BLOCK_N must be even"):
        gemv(x, torch.zeros(8, 64, device=DEVICE), config=(1, 64, 1, 1, 1), silu_out=True)
    # No K: silu_and_mul of the bias.
    b = torch.randn(8, device=DEVICE)
    out = gemv(torch.zeros(1, 0, device=DEVICE), torch.zeros(8, 0, device=DEVICE), b,
               silu_out=True)
    torch.testing.assert_close(out[0], b[:4] * torch.sigmoid(b[:4]) * b[4:])


@pytest.mark.parametrize("split_k", [1, 3])
def test_fp8_words_fuse_the_norm_and_the_activation(split_k):
    """The word-reading kernel's fused add-and-norm and SiLU-and-mul epilogue: the unfused
    kernels' values (the norm within a rounding of its sum)."""
    from kernels.rms_norm import rms_norm
    from kernels.silu_and_mul import silu_and_mul

    torch.manual_seed(split_k)
    num_in = 512
    w32 = torch.randn(48, num_in)
    scale = (w32.abs().amax(-1) / 448.0).float()
    w = (w32 / scale[:, None]).to(FP8_DTYPE).to(DEVICE)
    scale = scale.to(DEVICE)
    config = (16, 128, 4, 1, split_k)
    x, residual = (torch.randn(1, num_in, device=DEVICE).to(torch.bfloat16) for _ in "xr")
    norm_w = (torch.rand(num_in, device=DEVICE) + 0.5).to(torch.bfloat16)
    y, res_out = rms_norm_gemv(x, residual, norm_w, 1e-6, w, None, scale, config=config)
    normed, expected_res = rms_norm(x, norm_w, 1e-6, residual.clone())
    assert torch.equal(res_out, expected_res)
    assert_close(y, gemv(normed, w, None, scale, config=config), "norm e4m3 words",
                 torch.bfloat16)
    # The norm before and SiLU-and-mul after (the gate/up projection as served).
    act, act_res = rms_norm_gemv(x, residual, norm_w, 1e-6, w, None, scale, config=config,
                                 silu_out=True)
    assert torch.equal(act, silu_and_mul(y)) and torch.equal(act_res, res_out)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("num_in,split_k", [(256, 1), (300, 1), (512, 3)])
def test_rms_norm_gemv_equals_rms_norm_then_gemv(num_in, split_k, dtype):
    """The add-and-norm fused into the projection: the norm kernel's values (within a
    rounding of the norm's sum, which may add in another order) and its residual, exactly;
    the residual given is not written."""
    from kernels.rms_norm import rms_norm

    torch.manual_seed(num_in)
    x = torch.randn(1, num_in, device=DEVICE).to(dtype)
    residual = torch.randn(1, num_in, device=DEVICE).to(dtype)
    kept = residual.clone()
    norm_w = (torch.rand(num_in, device=DEVICE) + 0.5).to(dtype)
    w = torch.randn(40, num_in, device=DEVICE).to(dtype)
    config = (16, 128, 4, 1, split_k)
    y, res_out = rms_norm_gemv(x, residual, norm_w, 1e-6, w, config=config)
    normed, expected_res = rms_norm(x, norm_w, 1e-6, residual.clone())
    assert torch.equal(res_out, expected_res)
    assert torch.equal(residual, kept)
    expected = gemv(normed, w, config=config)
    atol, rtol = TOLERANCES[dtype]
    magnitude = normed.double().abs() @ w.double().abs().t()
    bound = atol + rtol * expected.double().abs() + 4 * rtol * magnitude / num_in ** 0.5
    assert bool(((y.double() - expected.double()).abs() <= bound).all())


def test_rms_norm_gemv_rejects_what_it_cannot_fuse():
    x = torch.zeros(2, 64, device=DEVICE)
    w = torch.zeros(8, 64, device=DEVICE)
    norm_w = torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match="1 row for the fused norm"):
        rms_norm_gemv(x, x.clone(), norm_w, 1e-6, w)
    with pytest.raises(ValueError, match="residual must have shape"):
        rms_norm_gemv(x[:1], x, norm_w, 1e-6, w)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        rms_norm_gemv(x[:1], x[:1].clone(), norm_w[:32].contiguous(), 1e-6, w)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, FP8_DTYPE])
def test_rms_norm_gemv_qkv_shape_on_gpu(weight_dtype):
    """Llama-3-8B's add-and-norm fused into its q/k/v projection, bf16 and e4m3 weights."""
    from kernels.rms_norm import rms_norm

    torch.manual_seed(0)
    x, residual = (torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16) for _ in "xr")
    norm_w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    w = (torch.randn(6144, 4096, device="cuda") * 0.02).to(weight_dtype)
    s = torch.rand(6144, device="cuda") + 0.5 if weight_dtype == FP8_DTYPE else None
    y, res_out = rms_norm_gemv(x, residual, norm_w, 1e-5, w, None, s)
    normed, expected_res = rms_norm(x, norm_w, 1e-5, residual)
    assert torch.equal(res_out, expected_res)
    expected = gemv(normed, w, None, s)
    assert_close(y, expected, "fused norm + q/k/v", torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, FP8_DTYPE])
def test_gate_up_silu_out_shape_on_gpu(weight_dtype):
    """Llama-3-8B's gate/up projection with the add-and-norm before it and SiLU-and-mul
    after it fused in: the SiLU-and-mul kernel's bits over the unfused output."""
    from kernels.silu_and_mul import silu_and_mul

    torch.manual_seed(0)
    x, residual = (torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16) for _ in "xr")
    norm_w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    w = (torch.randn(2 * 14336, 4096, device="cuda") * 0.02).to(weight_dtype)
    s = torch.rand(2 * 14336, device="cuda") + 0.5 if weight_dtype == FP8_DTYPE else None
    config = config_for(2 * 14336, 4096, w.element_size(), fused=True)
    act, res_out = rms_norm_gemv(x, residual, norm_w, 1e-5, w, None, s, config=config,
                                 silu_out=True)
    y, expected_res = rms_norm_gemv(x, residual, norm_w, 1e-5, w, None, s, config=config)
    assert torch.equal(act, silu_and_mul(y)) and torch.equal(res_out, expected_res)
    assert torch.equal(gemv(x, w, None, s, silu_out=True), silu_and_mul(gemv(x, w, None, s)))


def test_e4m3_tiles_depend_on_fusion(monkeypatch):
    """e4m3 weights: eight channels x 2 warps with a fused norm; unfused, four
    x 2 warps for a wide output and two x 4 otherwise; 16-bit weights keep four x 4."""
    import kernels.gemv as module

    monkeypatch.setattr(module, "is_interpreter", lambda: False)
    assert module.config_for(6144, 4096, 1, fused=True) == (8, 1024, 2, 1, 0)
    assert module.config_for(4096, 14336, 1, fused=True) == (8, 1024, 2, 1, 0)
    assert module.config_for(28672, 4096, 1) == (4, 1024, 2, 1, 0)
    assert module.config_for(4096, 4096, 1) == (2, 1024, 4, 1, 0)
    assert module.config_for(6144, 4096, 2, fused=True) == (4, 1024, 4, 1, 0)
    assert module.config_for(4096, 14336, 2) == (4, 512, 4, 1, 0)
