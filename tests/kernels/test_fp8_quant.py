"""The per-token FP8 activation quantization kernel against the torch expression it
replaces (``quantize_per_row``), and the RMSNorm and SiLU-and-mul kernels that quantize
their output against the unfused kernels and ``quantize_per_row``: scales and e4m3 values
identical."""

import pytest
import torch

from kernels.fp8_quant import per_token_quant_fp8
from kernels.rms_norm import rms_norm, rms_norm_quant_fp8
from kernels.silu_and_mul import silu_and_mul, silu_and_mul_quant_fp8
from tests.kernels.conftest import DEVICE, GPU_DTYPES, SMALL_DTYPES, needs_gpu
from worker_svc.layers.quantization import _MIN_SCALE, INV_FP8_MAX, quantize_per_row


def _check(num_rows: int, num_cols: int, dtype: torch.dtype, device: torch.device) -> None:
    torch.manual_seed(num_rows * 7 + num_cols)
    x = (torch.randn(num_rows, num_cols) * torch.logspace(-3, 2, num_rows)[:, None]).to(dtype)
    if num_rows > 2:
        x[1] = 0  # an all-zero row: the minimum scale
        x[2, 0] = 1e4  # an outlier sets its row's scale
    x = x.to(device)
    q, scale = per_token_quant_fp8(x, INV_FP8_MAX, _MIN_SCALE)
    want_q, want_scale = quantize_per_row(x)
    assert torch.equal(scale, want_scale)
    # Values, not bytes: a tiny negative input may round to +0 here and to -0 in torch.
    assert torch.equal(q.float(), want_q.float())


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("num_rows,num_cols", [(1, 64), (5, 1000), (3, 2500), (2, 16500)])
def test_per_token_quant_matches_torch(num_rows, num_cols, dtype):
    """Rows read once into registers, and (16500 columns) rows read twice in tiles."""
    _check(num_rows, num_cols, dtype, DEVICE)


def test_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="x"):
        per_token_quant_fp8(torch.zeros(4, device=DEVICE), INV_FP8_MAX, _MIN_SCALE)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_rows,num_cols", [(1, 4096), (256, 14336), (8192, 4096),
                                               (4, 20000)])
def test_per_token_quant_gpu(num_rows, num_cols, dtype):
    _check(num_rows, num_cols, dtype, torch.device("cuda"))


def _assert_within_one_step(q: torch.Tensor, want: torch.Tensor, max_fraction: float) -> None:
    """Every e4m3 value of ``q`` equal to ``want``'s or its neighbour (one step in sign and
    magnitude bits, zero's neighbours of either sign), and at most ``max_fraction`` of them
    not equal."""
    a, b = q.view(torch.uint8).int(), want.view(torch.uint8).int()
    mag_a, mag_b = a & 0x7F, b & 0x7F
    same_sign = (a >> 7) == (b >> 7)
    near_zero = (mag_a <= 1) & (mag_b <= 1)
    ok = (same_sign & ((mag_a - mag_b).abs() <= 1)) | near_zero
    assert bool(ok.all()), f"{int((~ok).sum())} values more than one e4m3 step apart"
    differ = int((q.float() != want.float()).sum())
    assert differ <= max_fraction * q.numel(), f"{differ} of {q.numel()} values differ"


def _check_fused(num_rows: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 with_residual: bool) -> None:
    """RMSNorm with the quantization in its epilogue, and SiLU-and-mul likewise, give the
    scales and e4m3 values of the unfused kernel followed by ``quantize_per_row``.

    One exception on the GPU: the fused norm's compiled layout gives each thread 16
    consecutive elements (the e4m3 store's 16 bytes) where the unfused one gives it 16 bytes
    of its output dtype, so the sum of squares adds in another order and a row's inverse
    root may differ in its last bits, and a normed value in the last bit of its dtype. There
    its scales are bounded by a float32 sum of ``hidden`` terms in another order ((hidden -
    1) * 2^-24 relative at worst) plus two of the dtype's ulps (a row's largest value
    rounded the other way, and the product with 1 / 448), and its values at one e4m3 step,
    for at most 1e-4 of them (H200, 8192 x 4096: float16 59 values one step apart and one
    scale one ulp apart, float32 29 scales up to 3.2e-7 apart); the interpreter adds in one
    order, and SiLU-and-mul has no sum: both exact."""
    torch.manual_seed(num_rows * 11 + hidden)
    x = (torch.randn(num_rows, hidden) * torch.logspace(-2, 2, num_rows)[:, None]).to(dtype)
    residual = torch.randn(num_rows, hidden).to(dtype) if with_residual else None
    weight = torch.rand(hidden).add(0.5).to(dtype)
    if num_rows > 2:
        x[1] = 0  # an all-zero row (with its residual): the minimum scale
        if residual is not None:
            residual[1] = 0
    x, weight = x.to(device), weight.to(device)
    residual = None if residual is None else residual.to(device)
    q, scale, summed = rms_norm_quant_fp8(x, weight, 1e-6, residual, INV_FP8_MAX, _MIN_SCALE)
    unfused = rms_norm(x, weight, 1e-6, residual)
    normed = unfused[0] if with_residual else unfused
    want_q, want_scale = quantize_per_row(normed)
    if device.type == "cpu":
        assert torch.equal(scale, want_scale)
        assert torch.equal(q.float(), want_q.float())
    else:
        rtol = (hidden - 1) * 2.0 ** -24 + 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(scale, want_scale, rtol=rtol, atol=0)
        _assert_within_one_step(q, want_q, 1e-4)
    if with_residual:
        assert torch.equal(summed, unfused[1])
    else:
        assert summed is None

    gate_up = (3 * torch.randn(num_rows, 2 * hidden)).to(dtype).to(device)
    q, scale = silu_and_mul_quant_fp8(gate_up, INV_FP8_MAX, _MIN_SCALE)
    want_q, want_scale = quantize_per_row(silu_and_mul(gate_up))
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.float(), want_q.float())


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("num_rows,hidden", [(1, 64), (5, 1000), (3, 16500)])
def test_norm_and_activation_quantize_as_the_unfused_kernels(num_rows, hidden, dtype,
                                                             with_residual):
    """16500: SiLU-and-mul's row is computed twice, tile by tile (one pass up to 16384)."""
    _check_fused(num_rows, hidden, dtype, DEVICE, with_residual)


def test_fused_quantization_rejects_what_it_cannot_read():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_quant_fp8(x, torch.ones(8, dtype=torch.float16, device=DEVICE), 1e-6, None,
                           INV_FP8_MAX, _MIN_SCALE)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_quant_fp8(x, torch.ones(8, device=DEVICE), 1e-6, torch.zeros(2, 4),
                           INV_FP8_MAX, _MIN_SCALE)
    with pytest.raises(ValueError, match="x"):
        silu_and_mul_quant_fp8(torch.zeros(2, 7, device=DEVICE), INV_FP8_MAX, _MIN_SCALE)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("num_rows,hidden", [(256, 4096), (8192, 4096), (17, 14336),
                                             (4, 20000)])
def test_fused_quantization_gpu(num_rows, hidden, dtype, with_residual):
    _check_fused(num_rows, hidden, dtype, torch.device("cuda"), with_residual)


def test_fused_quantization_of_empty_rows():
    """Rows of no elements quantize as all-zero rows (the minimum scale), as
    ``per_token_quant_fp8`` quantizes them."""
    x = torch.zeros(3, 0, device=DEVICE)
    q, scale = silu_and_mul_quant_fp8(x, INV_FP8_MAX, _MIN_SCALE)
    want_q, want_scale = per_token_quant_fp8(x, INV_FP8_MAX, _MIN_SCALE)
    assert q.shape == want_q.shape == (3, 0)
    assert torch.equal(scale, want_scale)
