"""Shared helpers for kernel tests: interpreter switch, tolerance table, comparisons.

Without CUDA the kernels run in Triton's interpreter; ``TRITON_INTERPRET`` must be set
before any module decorates a ``@triton.jit`` function, hence at conftest import time.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
# Small-shape tests run on the GPU when there is one, else in the interpreter.
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# The interpreter mishandles bf16 (numpy has no bf16), so CPU runs cover fp32/fp16.
SMALL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# (atol, rtol) per dtype: fp32 tight, half precisions about a few ulps of the output.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

# Pair with @pytest.mark.gpu on tests at realistic shapes.
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str,
                 dtype: torch.dtype | None = None, scale: float = 1.0,
                 equal_nan: bool = False) -> None:
    """Compare with the dtype's tolerance (times ``scale``); NaN (an unwritten, poisoned
    element) fails unless ``equal_nan``. Prints the mismatch count on failure."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    ok = torch.isclose(a, e, atol=atol * scale, rtol=rtol * scale, equal_nan=equal_nan)
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        diff = (a - e).abs()
        diff = diff[~torch.isnan(diff)]
        msg = (f"{name}: {int((~ok).sum())}/{ok.numel()} mismatches "
               f"(atol={atol * scale:g}, rtol={rtol * scale:g}); "
               f"max |diff| {float(diff.max()) if diff.numel() else float('nan'):g}; "
               f"NaN in actual: {int(torch.isnan(a).sum())}; first at {bad[0].tolist()}: "
               f"{float(a[tuple(bad[0])])} vs {float(e[tuple(bad[0])])}")
        print(msg)
        pytest.fail(msg)


@contextmanager
def poisoned_allocations():
    """Fill every tensor that ``torch.empty``/``empty_like`` return with NaN (floats) or
    the minimum value (ints) so an element a kernel forgets to write fails the test."""
    orig_empty, orig_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).min)
        return t

    torch.empty = lambda *a, **k: poison(orig_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(orig_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = orig_empty, orig_empty_like


def make_paged_kv(seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
                  dtype: torch.dtype, device: torch.device, spare_blocks: int = 3):
    """Random KV caches and shuffled, padded block tables covering ``seq_lens``."""
    blocks_per_req = [(n + block_size - 1) // block_size for n in seq_lens]
    max_blocks = max(blocks_per_req + [1]) + 1
    num_blocks = sum(blocks_per_req) + spare_blocks
    perm = torch.randperm(num_blocks).tolist()
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for i, nb in enumerate(blocks_per_req):
        block_tables[i, :nb] = torch.tensor(perm[:nb], dtype=torch.int32)
        perm = perm[nb:]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, dtype=torch.float32).to(dtype).to(device)
    value_cache = torch.randn(shape, dtype=torch.float32).to(dtype).to(device)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return key_cache, value_cache, block_tables.to(device), seq
