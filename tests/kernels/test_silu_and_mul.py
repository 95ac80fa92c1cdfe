import pytest
import torch

from kernels import torch_ref
from kernels.silu_and_mul import silu_and_mul
from tests.kernels.conftest import (
    DEVICE,
    GPU_DTYPES,
    SMALL_DTYPES,
    assert_close,
    needs_gpu,
    poisoned_allocations,
)


def _check(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    x = (3 * torch.randn(*shape, device=device)).to(dtype)
    with poisoned_allocations():
        out = silu_and_mul(x)
    assert_close(out, torch_ref.silu_and_mul(x), "silu_and_mul", dtype)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (5, 34), (3, 2, 2050)])
def test_silu_and_mul_matches_reference(shape, dtype):
    _check(shape, dtype, DEVICE)


def test_silu_and_mul_rejects_odd_last_dim():
    with pytest.raises(ValueError, match="x"):
        silu_and_mul(torch.randn(3, 7, device=DEVICE))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 28672), (4097, 28672)])
def test_silu_and_mul_gpu(shape, dtype):
    _check(shape, dtype, torch.device("cuda"))
