import pytest
import torch

from kernels.argmax import argmax
from tests.kernels.conftest import (
    DEVICE,
    GPU_DTYPES,
    SMALL_DTYPES,
    needs_gpu,
    poisoned_allocations,
)


def _check(logits: torch.Tensor) -> None:
    with poisoned_allocations():  # the output and the chunk workspaces start as garbage
        out = argmax(logits)
    assert out.dtype == torch.int64 and out.shape == logits.shape[:1]
    expected = torch.argmax(logits.float().cpu(), dim=-1)
    assert torch.equal(out.cpu(), expected), f"{out.tolist()} != {expected.tolist()}"


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_matches_torch_with_ties_nan_and_infinities(dtype):
    torch.manual_seed(0)
    vocab = 1000  # several chunks in the interpreter, the last one ragged
    x = torch.randn(9, vocab).to(dtype)
    x[1, 300] = x[1, 900] = 50.0  # a tie across chunks: the first index
    x[2, 10] = x[2, 11] = 50.0  # a tie inside a chunk
    x[3, 700] = float("nan")
    x[3, 5] = float("inf")  # a NaN wins over +inf
    x[4, 999] = float("nan")
    x[4, 998] = float("nan")
    x[5] = float("-inf")  # all -inf: index 0
    x[6, 999] = 60.0  # the max in the last, ragged chunk
    x[7, 0] = float("inf")
    x[7, 512] = float("inf")
    x[8, :] = 1.0  # all equal
    _check(x.to(DEVICE))


def test_one_column_and_strided_rows():
    _check(torch.randn(3, 1, device=DEVICE))
    wide = torch.randn(4, 700, device=DEVICE)
    _check(wide[:, :513])  # rows 700 apart
    assert argmax(torch.empty(0, 5, device=DEVICE)).shape == (0,)


def test_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="logits"):
        argmax(torch.randn(5, device=DEVICE))
    with pytest.raises(ValueError, match="logits"):
        argmax(torch.zeros(2, 5, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="logits"):
        argmax(torch.randn(2, 0, device=DEVICE))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rows", [1, 64])
def test_large_vocab_on_gpu(rows, dtype):
    x = torch.randn(rows, 128256, device="cuda").to(dtype)
    x[0, 100000] = x[0, 127000] = 99.0
    _check(x)
