"""The per-token FP8 activation quantization kernel against the torch expression it
replaces (``quantize_per_row``): scales and e4m3 values identical."""

import pytest
import torch

from kernels.fp8_quant import per_token_quant_fp8
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
