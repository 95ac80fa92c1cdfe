import pytest
import torch

from kernels import torch_ref
from kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_cpu
from tests.kernels.conftest import DEVICE, GPU_DTYPES, SMALL_DTYPES, needs_gpu

NEG_INF = float("-inf")


def _bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """``[R, V]`` bool -> packed int32 words (independent of the code under test)."""
    num_rows, vocab = allowed.shape
    num_words = -(-vocab // 32)
    padded = torch.zeros(num_rows, num_words * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    words = (padded.view(num_rows, num_words, 32) << torch.arange(32)).sum(dim=-1)
    # Bit 31 set reads as a negative int32.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _case(num_rows: int, vocab: int, rows: list[int], dtype: torch.dtype,
          device: torch.device, fraction: float = 0.3):
    logits = torch.randn(num_rows, vocab).to(dtype)
    allowed = torch.rand(len(rows), vocab) < fraction
    allowed[:, -1] = True  # the last bit of a word (bit 31 when vocab % 32 == 0)
    bitmask = _bitmask(allowed)
    expected = logits.clone()
    for r, row in enumerate(rows):
        expected[row, ~allowed[r]] = NEG_INF
    return (logits.to(device), bitmask.to(device),
            torch.tensor(rows, dtype=torch.long, device=device), expected)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("num_rows,vocab,rows", [
    (1, 32, [0]), (4, 97, [3, 1]), (6, 2050, [0, 2, 5]), (3, 1024, []), (2, 1, [1]),
])
def test_token_bitmask_matches_reference(num_rows, vocab, rows, dtype):
    logits, bitmask, index, expected = _case(num_rows, vocab, rows, dtype, DEVICE)
    reference = logits.clone()
    torch_ref.apply_token_bitmask(reference, bitmask, index)
    assert torch.equal(reference.cpu(), expected)  # the oracle against a plain loop
    apply_token_bitmask(logits, bitmask, index)
    # Allowed logits keep their exact bits; unconstrained rows are untouched.
    assert torch.equal(logits.cpu(), expected), \
        f"{int((logits.cpu() != expected).sum())} mismatches"


@pytest.mark.parametrize("num_rows,vocab,rows", [
    (1, 32, [0]), (4, 97, [3, 1]), (6, 2050, [0, 1, 2, 3, 4, 5]), (3, 1024, []),
])
def test_cpu_launcher_matches_the_reference(num_rows, vocab, rows):
    pytest.importorskip("xgrammar")
    logits, bitmask, index, expected = _case(num_rows, vocab, rows, torch.float32,
                                             torch.device("cpu"))
    apply_token_bitmask_cpu(logits, bitmask, index)
    assert torch.equal(logits, expected), f"{int((logits != expected).sum())} mismatches"


def test_unpack_token_bitmask_reads_xgrammars_layout():
    xgr = pytest.importorskip("xgrammar")
    bitmask = xgr.allocate_token_bitmask(1, 70)
    xgr.reset_token_bitmask(bitmask)  # all allowed
    bitmask[0, 0] = 0b101  # only tokens 0 and 2 of the first word
    bitmask[0, 2] = 1 << 3  # token 67
    logits = torch.zeros(1, 70)
    xgr.apply_token_bitmask_inplace(logits, bitmask, backend="torch_native")
    allowed = torch_ref.unpack_token_bitmask(bitmask, 70)[0]
    assert torch.equal(allowed, logits[0] == 0)
    assert allowed.nonzero().flatten().tolist()[:2] == [0, 2] and not allowed[1]


@pytest.mark.parametrize("name,kwargs", [
    ("bitmask", {"bitmask": torch.zeros(2, 3, dtype=torch.int32)}),
    ("bitmask", {"bitmask": torch.zeros(1, 1, dtype=torch.int64)}),
    ("rows", {"rows": torch.zeros(1, dtype=torch.float32)}),
    ("logits", {"logits": torch.zeros(2, 70, dtype=torch.int32)}),
])
def test_token_bitmask_rejects_bad_arguments(name, kwargs):
    args = {"logits": torch.zeros(2, 70), "bitmask": torch.zeros(1, 3, dtype=torch.int32),
            "rows": torch.zeros(1, dtype=torch.long)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{name}"):
        apply_token_bitmask(**{k: v.to(DEVICE) for k, v in args.items()})


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_rows,vocab", [(64, 151936), (256, 32000), (1, 262144)])
def test_token_bitmask_gpu(num_rows, vocab, dtype):
    rows = list(range(0, num_rows, 2))
    logits, bitmask, index, expected = _case(num_rows, vocab, rows, dtype,
                                             torch.device("cuda"), fraction=0.01)
    apply_token_bitmask(logits, bitmask, index)
    assert torch.equal(logits.cpu(), expected)
