"""The e4m3-weight matmul for decode-sized batches against torch: ``x @ (W * s)^T + b``
computed in float32 from the same e4m3 weight.

Tolerance per element: the dtype's (atol, rtol) for the output's rounding, plus float32
accumulation error, which grows with the sum of the terms' magnitudes (``|x| @ |W s|^T``),
not with the result (a near-zero output of large terms carries the large terms' error)."""

import pytest
import torch

from kernels.fp8 import FP8_DTYPE
from kernels.fp8_gemv import MAX_ROWS, fp8_weight_matmul
from tests.kernels.conftest import DEVICE, GPU_DTYPES, SMALL_DTYPES, TOLERANCES, needs_gpu

# Relative float32 accumulation error allowed against the sum of |terms| (16 ulps).
ACCUMULATION_EPS = 2.0 ** -20


def _operands(num_rows, num_out, num_in, dtype, device, has_bias):
    torch.manual_seed(num_rows * 131 + num_out + num_in)
    weight = torch.randn(num_out, num_in) * torch.logspace(-2, 1, num_out)[:, None]
    scale = (weight.abs().amax(-1) / 448.0).float()
    weight_q = (weight / scale[:, None]).clamp(-448, 448).to(FP8_DTYPE)
    x = torch.randn(num_rows, num_in).to(dtype)
    bias = torch.randn(num_out).to(dtype) if has_bias else None
    dequantized = weight_q.float() * scale[:, None]
    expected = x.float() @ dequantized.t()
    if has_bias:
        expected += bias.float()
    magnitude = x.float().abs() @ dequantized.abs().t()
    to = (lambda t: None if t is None else t.to(device))
    return to(x), to(weight_q), to(scale), to(bias), (expected, magnitude)


def _check(num_rows, num_out, num_in, dtype, device, has_bias, config=None):
    x, w, s, b, (expected, magnitude) = _operands(num_rows, num_out, num_in, dtype, device,
                                                  has_bias)
    kwargs = {} if config is None else {"config": config}
    out = fp8_weight_matmul(x, w, s, b, **kwargs)
    assert out.dtype == dtype and out.shape == (num_rows, num_out)
    atol, rtol = TOLERANCES[dtype]
    error = (out.float().cpu() - expected).abs()
    bound = atol + rtol * expected.abs() + ACCUMULATION_EPS * magnitude
    bad = error > bound
    assert not bool(bad.any()), (f"{int(bad.sum())}/{bad.numel()} outside the bound; worst "
                                 f"{float((error / bound).max()):.2f}x the bound")


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("num_rows,num_out,num_in,has_bias",
                         [(1, 64, 256, False), (2, 30, 1100, True), (3, 37, 300, False),
                          (5, 100, 300, True), (MAX_ROWS, 48, 512, False)])
def test_matches_torch(num_rows, num_out, num_in, has_bias, dtype):
    """Rows padded to the tile, ragged N and K."""
    _check(num_rows, num_out, num_in, dtype, DEVICE, has_bias, config=(32, 128, 4, 2, 1))


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_matches_torch_and_repeats_exactly(split_k):
    """K spread over programs: the same values, bit for bit on a second launch (the
    partials are added in split order), and the counters are left at zero for the next."""
    x, w, s, b, (expected, magnitude) = _operands(7, 70, 600, torch.float32, DEVICE, True)
    config = (32, 128, 4, 2, split_k)
    first = fp8_weight_matmul(x, w, s, b, config=config)
    second = fp8_weight_matmul(x, w, s, b, config=config)
    assert torch.equal(first, second)
    bound = 2e-5 + 2e-5 * expected.abs() + ACCUMULATION_EPS * magnitude
    assert bool(((first.cpu() - expected).abs() <= bound).all())


def test_rejects_what_it_cannot_read():
    x, w, s, b, _ = _operands(2, 32, 64, torch.float32, DEVICE, True)
    with pytest.raises(ValueError, match="x must have at most"):
        fp8_weight_matmul(torch.zeros(MAX_ROWS + 1, 64, device=DEVICE), w, s)
    with pytest.raises(ValueError, match="weight must have dtype"):
        fp8_weight_matmul(x, w.float(), s)
    with pytest.raises(ValueError, match="weight must have shape"):
        fp8_weight_matmul(x[:, :32].contiguous(), w, s)
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        fp8_weight_matmul(x, w, s[:16].contiguous())
    with pytest.raises(ValueError, match="bias must have shape"):
        fp8_weight_matmul(x, w, s, b[:16].contiguous())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_rows", [1, 3, MAX_ROWS])
# Llama-3-8B's decoder: merged q/k/v, o, merged gate/up, down.
@pytest.mark.parametrize("num_out,num_in", [(6144, 4096), (4096, 4096), (28672, 4096),
                                            (4096, 14336)])
def test_llama3_8b_shapes_gpu(num_rows, num_out, num_in, dtype):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 conversions in Triton need compute capability 8.9+")
    _check(num_rows, num_out, num_in, dtype, torch.device("cuda"), has_bias=num_rows == 4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("split_k", [2, 4, 8])
def test_split_k_gpu(split_k):
    """Split K on the GPU: right values, identical over repeated launches."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 conversions in Triton need compute capability 8.9+")
    x, w, s, b, (expected, magnitude) = _operands(MAX_ROWS, 4096, 14336, torch.bfloat16,
                                                  torch.device("cuda"), True)
    config = (32, 256, 4, 4, split_k)
    outs = [fp8_weight_matmul(x, w, s, b, config=config) for _ in range(5)]
    assert all(torch.equal(outs[0], out) for out in outs[1:])
    atol, rtol = TOLERANCES[torch.bfloat16]
    bound = atol + rtol * expected.abs() + ACCUMULATION_EPS * magnitude
    assert bool(((outs[0].float().cpu() - expected).abs() <= bound).all())

