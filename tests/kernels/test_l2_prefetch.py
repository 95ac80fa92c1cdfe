"""The L2 prefetch kernel: its checks, its spans, its sm_90 code (compiled without a GPU),
and on a GPU that it runs and changes nothing (what it gains is timed by
benchmarks/l2_prefetch.py)."""

from __future__ import annotations

import re

import pytest
import torch

from kernels.l2_prefetch import CHUNK, GATE_ROWS, l2_prefetch, span_bytes, supported
from tests.kernels.conftest import needs_gpu


def test_span_bytes_is_a_byte_view_of_whole_chunks():
    t = torch.zeros(100, 50, dtype=torch.bfloat16)  # 10,000 bytes
    span = span_bytes(t, 7000, chunk=1024)
    assert span.dtype == torch.uint8 and span.numel() == 6144
    assert span.data_ptr() == t.data_ptr()
    assert span_bytes(t, 1 << 30, chunk=1024).numel() == 9216  # all of it, rounded down
    assert span_bytes(t, 1000, chunk=1024).numel() == 0
    with pytest.raises(ValueError, match="t must be contiguous"):
        span_bytes(t.t(), 1024)


def test_bad_arguments_name_the_field():
    span = torch.zeros(2 * CHUNK, dtype=torch.uint8)
    with pytest.raises(ValueError, match="span must have dtype"):
        l2_prefetch(span.view(torch.int16))
    with pytest.raises(ValueError, match="span must hold whole chunks"):
        l2_prefetch(span[:CHUNK + 16])
    with pytest.raises(ValueError, match="chunk must be a positive multiple of 16"):
        l2_prefetch(span, chunk=100)
    with pytest.raises(ValueError, match="span must start 16-byte aligned"):
        l2_prefetch(span[8:8 + CHUNK])
    with pytest.raises(ValueError, match="seq_lens must have dtype"):
        l2_prefetch(span, seq_lens=torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=f"at most {GATE_ROWS} requests"):
        l2_prefetch(span, seq_lens=torch.ones(GATE_ROWS + 1, dtype=torch.int32))


def test_off_the_gpu_it_does_nothing():
    assert not supported(torch.device("cpu"))
    l2_prefetch(torch.zeros(CHUNK, dtype=torch.uint8))  # no launch, no error


@pytest.mark.parametrize("evict_last", [True, False])
@pytest.mark.parametrize("gate", [True, False])
def test_sm90_code_is_one_bulk_prefetch_a_thread(evict_last, gate):
    from tests.kernels.sm90_ptx import compile_triton_for_sm90

    ptx = compile_triton_for_sm90(
        "kernels.l2_prefetch", "_l2_prefetch_kernel",
        {"base_ptr": "*u8", "seq_lens_ptr": "*i32"},
        dict(CHUNK=CHUNK, BLOCK=32, GATE=gate, GATE_ROWS=GATE_ROWS, EVICT_LAST=evict_last),
        options={"num_warps": 1})
    prefetches = re.findall(r"cp\.async\.bulk\.prefetch\.L2\.global(\S*)", ptx)
    assert prefetches == ([".L2::cache_hint"] if evict_last else [""])
    assert ("createpolicy.fractional.L2::evict_last" in ptx) == evict_last
    # The gate: the requests' lengths are loaded and summed, and a branch skips the
    # prefetch; without it nothing is loaded.
    assert ("ld.global" in ptx) == gate
    assert bool(re.search(r"@%p\d+ bra", ptx)) == gate


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("evict_last", [True, False])
def test_prefetch_runs_and_changes_nothing(evict_last):
    device = torch.device("cuda")
    if not supported(device):
        pytest.skip("bulk prefetches need compute capability 9.0+")
    weight = torch.randn(4096, 3072, device=device, dtype=torch.bfloat16)
    before = weight.clone()
    span = span_bytes(weight, weight.numel() * 2)
    lens = torch.tensor([3000, 5000], dtype=torch.int32, device=device)
    l2_prefetch(span, evict_last=evict_last)
    l2_prefetch(span, seq_lens=lens, max_kv_tokens=8000, evict_last=evict_last)  # fetches
    l2_prefetch(span, seq_lens=lens, max_kv_tokens=7999, evict_last=evict_last)  # gated
    l2_prefetch(span_bytes(weight, 5 * CHUNK), evict_last=evict_last)  # one program, spare
    torch.cuda.synchronize()
    assert torch.equal(weight, before)
