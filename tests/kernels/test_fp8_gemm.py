"""The tiled FP8 GEMM against torch: ``(x_q @ W_q^T) * s_x * s_w + b`` computed in float64
from the same e4m3 operands and scales.

Tolerance per element: the output dtype's (atol, rtol) for its rounding, plus accumulation
error, which grows with the sum of the terms' magnitudes (``|x| @ |W|^T`` scaled), not with
the result: float32's in Triton's CPU interpreter; on a GPU, Hopper's FP8 tensor cores keep
~14 mantissa bits while they add (the kernel, like ``torch._scaled_mm(...,
use_fast_accum=True)``, leaves the whole K there), so the element bound is looser there and
the whole output must also be within 1% of the reference (an element from a wrong tile or
scale is off by ~100%). On the GPU also against ``torch._scaled_mm`` (cuBLAS), the product
the kernel stands in for."""

import pytest
import torch

from kernels.fp8 import FP8_DTYPE
from kernels.fp8_gemm import DEFAULT_CONFIG, config_for, fp8_gemm, tile_sms, uses_tiles
from kernels.fp8_quant import per_token_quant_fp8
from tests.kernels.conftest import DEVICE, TOLERANCES, needs_gpu
from worker_svc.layers.quantization import quantize_per_row

# Relative accumulation error allowed against the sum of |terms|: float32 (16 ulps), and
# the FP8 tensor cores' reduced-precision sums.
ACCUMULATION_EPS = 2.0 ** -20
GPU_ACCUMULATION_EPS = 2.0 ** -8


def _operands(num_rows, num_out, num_in, device, has_bias, out_dtype):
    torch.manual_seed(num_rows * 131 + num_out + num_in)
    # As the FP8 layer quantizes: the weight per output channel, x per row.
    w_q, w_scale = quantize_per_row(
        torch.randn(num_out, num_in) * torch.logspace(-2, 1, num_out)[:, None])
    w_scale = w_scale[:, 0].contiguous()
    x_q, x_scale = quantize_per_row(
        torch.randn(num_rows, num_in) * torch.logspace(-1, 1, num_rows)[:, None])
    bias = torch.randn(num_out).to(out_dtype) if has_bias else None
    xd = x_q.double() * x_scale.double()
    wd = w_q.double() * w_scale.double()[:, None]
    expected = xd @ wd.t() + (0.0 if bias is None else bias.double())
    magnitude = xd.abs() @ wd.abs().t()
    to = (lambda t: None if t is None else t.to(device))
    return (to(x_q), to(x_scale), to(w_q), to(w_scale), to(bias)), (expected, magnitude)


def _check(out, expected, magnitude, out_dtype, eps=ACCUMULATION_EPS):
    atol, rtol = TOLERANCES[out_dtype]
    error = (out.double().cpu() - expected).abs()
    if eps != ACCUMULATION_EPS:
        relative = float(error.norm() / expected.norm())
        assert relative < 0.01, f"the output is {relative:.3g} off the reference (norm)"
    bound = atol + rtol * expected.abs() + eps * magnitude
    bad = error > bound
    assert not bool(bad.any()), (f"{int(bad.sum())}/{bad.numel()} outside the bound; worst "
                                 f"{float((error / bound).max()):.2f}x the bound")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_rows,num_out,num_in,has_bias",
                         [(1, 32, 64, False), (40, 72, 160, True), (64, 64, 96, False),
                          (33, 100, 48, True)])
def test_matches_torch(num_rows, num_out, num_in, has_bias, out_dtype):
    """Whole and partial tiles along M, N and K (the bulk copies' zero fill past each
    bound)."""
    args, (expected, magnitude) = _operands(num_rows, num_out, num_in, DEVICE, has_bias,
                                            out_dtype)
    out = fp8_gemm(*args, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (num_rows, num_out)
    _check(out, expected, magnitude, out_dtype)


def test_empty_products():
    w = torch.zeros(8, 32, device=DEVICE).to(FP8_DTYPE)
    s = torch.ones(8, device=DEVICE)
    x = torch.zeros(0, 32, device=DEVICE).to(FP8_DTYPE)
    assert fp8_gemm(x, torch.ones(0, 1, device=DEVICE), w, s).shape == (0, 8)
    b = torch.randn(8, device=DEVICE)
    out = fp8_gemm(torch.zeros(3, 0, device=DEVICE).to(FP8_DTYPE), torch.ones(3, 1, device=DEVICE),
                   torch.zeros(8, 0, device=DEVICE).to(FP8_DTYPE), s, b, torch.float32)
    assert torch.equal(out, b.expand(3, 8))


def test_rejects_what_it_cannot_read():
    x = torch.zeros(4, 32, device=DEVICE).to(FP8_DTYPE)
    xs = torch.ones(4, 1, device=DEVICE)
    w = torch.zeros(8, 32, device=DEVICE).to(FP8_DTYPE)
    ws = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="x must have dtype"):
        fp8_gemm(x.float(), xs, w, ws)
    with pytest.raises(ValueError, match="weight must have shape"):
        fp8_gemm(x, xs, torch.zeros(8, 48, device=DEVICE).to(FP8_DTYPE), ws)
    with pytest.raises(ValueError, match="multiple of 16"):
        fp8_gemm(torch.zeros(4, 24, device=DEVICE).to(FP8_DTYPE), xs,
                 torch.zeros(8, 24, device=DEVICE).to(FP8_DTYPE), ws)
    with pytest.raises(ValueError, match="x_scale must have 4 values"):
        fp8_gemm(x, torch.ones(3, 1, device=DEVICE), w, ws)
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        fp8_gemm(x, xs, w, torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="bias must have shape"):
        fp8_gemm(x, xs, w, ws, torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_gemm(x, xs, w, ws, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="16-byte aligned"):
        fp8_gemm(torch.zeros(4 * 32 + 1, device=DEVICE).to(FP8_DTYPE)[1:].view(4, 32), xs,
                 w, ws)


def test_tiles_only_where_cublas_leaves_sms_idle():
    """At most two 64 x 64 output tiles per SM (an H200 has 132): Llama-3-8B's o and down
    projections (4096 channels) up to 256 rows, q/k/v (6144) up to 128, gate/up never past
    the weight-only kernel's rows; no SMs (a weight it cannot read): never."""
    assert uses_tiles(256, 4096, 132) and uses_tiles(128, 6144, 132)
    assert not uses_tiles(256, 6144, 132) and not uses_tiles(512, 4096, 132)
    assert not uses_tiles(32, 28672, 132)
    assert not uses_tiles(1, 64, 0)
    assert tile_sms(torch.zeros(64, 64).to(FP8_DTYPE)) == 0  # not on a GPU


def test_launch_by_rows_and_depth():
    """64 x 128 tiles past 128 rows; up to 128 rows, eight stages for a K of 8192+ (the
    down projection), the default otherwise."""
    assert config_for(256, 4096)[:2] == (64, 128) and config_for(129, 14336)[:2] == (64, 128)
    assert config_for(128, 14336)[4] == 8 and config_for(64, 8192)[4] == 8
    assert config_for(128, 4096) == DEFAULT_CONFIG == config_for(17, 8191)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_rows,num_out,num_in", [(256, 4096, 4096), (128, 6144, 4096),
                                                     (200, 4096, 14336), (17, 4096, 4096),
                                                     (64, 4096, 14336)])
def test_decoder_shapes_on_gpu(num_rows, num_out, num_in):
    """Llama-3-8B's shapes at decode batches: the float64 bound, and cuBLAS's FP8 GEMM on
    the same operands within bf16's tolerance."""
    args, (expected, magnitude) = _operands(num_rows, num_out, num_in, torch.device("cuda"),
                                            True, torch.bfloat16)
    out = fp8_gemm(*args)
    _check(out, expected, magnitude, torch.bfloat16, GPU_ACCUMULATION_EPS)
    x_q, x_scale, w_q, w_scale, bias = args
    cublas = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale[None, :],
                              bias=bias, out_dtype=torch.bfloat16)
    _check(out, cublas.double().cpu(), magnitude, torch.bfloat16, GPU_ACCUMULATION_EPS)
    # How far each is from the float64 product (printed for the record with -s).
    for name, y in (("fp8_gemm", out), ("cuBLAS", cublas)):
        err = (y.double().cpu() - expected).abs() / magnitude
        print(f"{name} {tuple(out.shape)}: max |error| / magnitude {float(err.max()):.2e}")


@pytest.mark.gpu
@needs_gpu
def test_takes_the_quantized_activations_and_a_cuda_graph():
    """As the FP8 layer calls it at decode: per-token quantized bf16 rows, replayed from a
    CUDA graph (the descriptors captured by value) with new activations."""
    torch.manual_seed(0)
    w = torch.randn(4096, 4096, device="cuda") * 0.02
    w_scale = (w.abs().amax(-1) / 448.0).float()
    w_q = (w / w_scale[:, None]).to(FP8_DTYPE)
    assert tile_sms(w_q) > 0
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)

    def run():
        x_q, x_scale = per_token_quant_fp8(x, 1.0 / 448.0, 1e-12)
        return fp8_gemm(x_q, x_scale, w_q, w_scale)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, run())
