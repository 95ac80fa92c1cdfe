import pytest
import torch

from kernels import torch_ref
from kernels.rms_norm import rms_norm
from tests.kernels.conftest import (
    DEVICE,
    GPU_DTYPES,
    SMALL_DTYPES,
    assert_close,
    needs_gpu,
    poisoned_allocations,
)


def _check(num_rows: int, hidden: int, dtype: torch.dtype, with_residual: bool,
           device: torch.device) -> None:
    x = torch.randn(num_rows, hidden, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    residual = torch.randn(num_rows, hidden, device=device).to(dtype) if with_residual else None
    with poisoned_allocations():
        out = rms_norm(x, weight, 1e-6, residual)
    expected = torch_ref.rms_norm(x, weight, 1e-6, residual)
    if with_residual:
        assert_close(out[0], expected[0], "normed", dtype)
        assert_close(out[1], expected[1], "residual", dtype)
    else:
        assert_close(out, expected, "normed", dtype)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("num_rows,hidden", [(1, 16), (7, 100), (33, 64)])
def test_rms_norm_matches_reference(num_rows, hidden, dtype, with_residual):
    _check(num_rows, hidden, dtype, with_residual, DEVICE)


def test_rms_norm_keeps_leading_dims():
    x = torch.randn(2, 3, 24, device=DEVICE)
    weight = torch.randn(24, device=DEVICE)
    assert_close(rms_norm(x, weight, 1e-5), torch_ref.rms_norm(x, weight, 1e-5), "3d")


def test_rms_norm_rejects_bad_arguments():
    x = torch.randn(4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(31, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.randn(32, device=DEVICE), 1e-6, residual=torch.randn(4, 31))
    with pytest.raises(ValueError, match="x"):
        rms_norm(torch.randn(32, 4, device=DEVICE).t(), torch.randn(32, device=DEVICE), 1e-6)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("num_rows,hidden", [(1, 4096), (513, 4096), (2048, 5120)])
def test_rms_norm_gpu(num_rows, hidden, dtype, with_residual):
    _check(num_rows, hidden, dtype, with_residual, torch.device("cuda"))
