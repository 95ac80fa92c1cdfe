"""Asks the L2 cache to fetch a span of device memory ahead of the kernel that will read it
(Hopper: ``cp.async.bulk.prefetch.L2``).

At batch-1 decode every weight is read once a step, and between the projections a step
runs kernels that read almost nothing from device memory (rotary and the KV write, decode
attention over a short context, its split merge, the norms): for ~10 us a layer the DRAM
is idle. A prefetch issued at the start of such a window, on a side stream, has the bytes
of the next projections in L2 when their GEMV starts (the worker's use:
``worker_svc.layers.l2_prefetch``). It changes no data and no result: a cache hint.

Each program issues ``BLOCK`` bulk prefetches of ``CHUNK`` bytes (one per element, spread
over its threads) and exits; the copy engine of its SM carries them on, so a span of
tens of megabytes costs a launch of a few dozen one-warp programs. The L2 keeps the lines
with the ``evict_last`` priority (``EVICT_LAST``), so the GEMVs' own streaming reads
(``evict_first``) do not push them out before they are read.

A gate keeps a step whose attention reads much of the cache itself from paying for a
prefetch that its own reads would evict: with ``seq_lens``, the programs do nothing when
the step's requests hold more than ``max_kv_tokens`` tokens together.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import capability, check_tensor, is_interpreter

# Bytes per bulk prefetch, and prefetches per program (a program per 512 KiB).
CHUNK = 16384
BLOCK = 32
# Requests the gate adds up (a decode step of at most this many rows).
GATE_ROWS = 16


@triton.jit
def _issue(base_ptr, num_bytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
           EVICT_LAST: tl.constexpr):
    """This program's ``BLOCK`` bulk prefetches of ``CHUNK`` bytes, one an element."""
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    # Past the span (the last program's spare elements) the first chunk again.
    ptrs = base_ptr + tl.where(offs < num_bytes, offs, 0)
    sizes = tl.full([BLOCK], CHUNK, tl.int32)
    if EVICT_LAST:
        tl.inline_asm_elementwise(
            """{
            .reg .b64 policy;
            createpolicy.fractional.L2::evict_last.b64 policy, 1.0;
            cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, policy;
            mov.u32 $0, 0;
            }""", "=r,l,r", [ptrs, sizes], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(
            """{
            cp.async.bulk.prefetch.L2.global [$1], $2;
            mov.u32 $0, 0;
            }""", "=r,l,r", [ptrs, sizes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit(do_not_specialize=["num_bytes", "num_reqs", "max_kv_tokens"])
def _l2_prefetch_kernel(base_ptr, num_bytes, seq_lens_ptr, num_reqs, max_kv_tokens,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr, GATE: tl.constexpr,
                        GATE_ROWS: tl.constexpr, EVICT_LAST: tl.constexpr):
    if GATE:
        r = tl.arange(0, GATE_ROWS)
        total = tl.sum(tl.load(seq_lens_ptr + r, mask=r < num_reqs, other=0))
        if total <= max_kv_tokens:
            _issue(base_ptr, num_bytes, CHUNK, BLOCK, EVICT_LAST)
    else:
        _issue(base_ptr, num_bytes, CHUNK, BLOCK, EVICT_LAST)


def supported(device: torch.device) -> bool:
    """Whether ``l2_prefetch`` issues anything on ``device``: a CUDA GPU of compute
    capability 9.0+ (bulk prefetches), not Triton's CPU interpreter."""
    return device.type == "cuda" and not is_interpreter() and capability(device) >= (9, 0)


def span_bytes(t: torch.Tensor, num_bytes: int, chunk: int = CHUNK) -> torch.Tensor:
    """The first ``num_bytes`` of the contiguous tensor ``t`` (at most all of it) as a
    ``uint8`` view, rounded down to whole ``chunk``s (a prefetch never passes the end)."""
    check_tensor("t", t, contiguous=True)
    flat = t.reshape(-1).view(torch.uint8)
    num_bytes = min(num_bytes, flat.numel()) // chunk * chunk
    return flat[:num_bytes]


def l2_prefetch(span: torch.Tensor, seq_lens: torch.Tensor | None = None,
                max_kv_tokens: int = 0, evict_last: bool = True, chunk: int = CHUNK,
                block: int = BLOCK) -> None:
    """Asks L2 to fetch ``span`` (a ``uint8`` view of whole ``chunk``s, ``span_bytes``)
    on the current stream, or does nothing where not ``supported``.

    Args:
        span: the bytes, 16-byte aligned.
        seq_lens: ``[B]`` int32, B <= ``GATE_ROWS``: with it, nothing is fetched when
            ``seq_lens.sum() > max_kv_tokens`` (read on the device: no sync).
        evict_last: the lines' L2 eviction priority (else the normal one).
        chunk, block: bytes per bulk prefetch (a multiple of 16), prefetches per program.
    """
    check_tensor("span", span, ndim=1, dtypes=(torch.uint8,), contiguous=True)
    if chunk <= 0 or chunk % 16:
        raise ValueError(f"chunk must be a positive multiple of 16, got {chunk}.")
    if span.numel() % chunk:
        raise ValueError(f"span must hold whole chunks of {chunk} bytes, got {span.numel()}.")
    if span.data_ptr() % 16:
        raise ValueError("span must start 16-byte aligned.")
    if seq_lens is not None:
        check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,),
                     device=span.device)
        if seq_lens.shape[0] > GATE_ROWS:
            raise ValueError(f"seq_lens may hold at most {GATE_ROWS} requests, got "
                             f"{seq_lens.shape[0]}.")
    if span.numel() == 0 or not supported(span.device):
        return
    grid = (triton.cdiv(span.numel() // chunk, block),)
    _l2_prefetch_kernel[grid](
        span, span.numel(), span if seq_lens is None else seq_lens,
        0 if seq_lens is None else seq_lens.shape[0], max_kv_tokens,
        CHUNK=chunk, BLOCK=block, GATE=seq_lens is not None, GATE_ROWS=GATE_ROWS,
        EVICT_LAST=evict_last, num_warps=1)
