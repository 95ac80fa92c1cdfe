"""Row-wise argmax of logits (greedy decoding): ``torch.argmax(logits, dim=-1)``.

The index is the first of the row's largest value, and a NaN counts as larger than any
number (the first NaN wins), as torch's argmax has it. At batch 1 torch reduces a
128k-entry row in one long pass; here a grid of (row, chunk) programs each finds the max
and its first index in one chunk, and a second launch picks, per row, the first chunk that
holds the row's max. Both launch early behind the kernel before (dependent launches), and
the sequence is fixed (CUDA-graph friendly, no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import (
    FLOAT_DTYPES,
    check_tensor,
    gdc_launch_dependents,
    gdc_wait,
    is_interpreter,
    launch_dependent_args,
    next_power_of_2,
)

_CHUNK = 4096
_INTERPRETER_CHUNK = 256  # fewer lanes per program to step through on the CPU


@triton.jit
def _chunk_argmax_kernel(x_ptr, max_ptr, arg_ptr, stride_x, num_cols, num_chunks,
                         CHUNK: tl.constexpr, USE_GDC: tl.constexpr):
    if USE_GDC:  # launched early: wait for the kernel that writes x
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < num_cols,
                other=float("-inf")).to(tl.float32)
    is_nan = x != x
    # The first NaN if any (stored as the chunk's max: NaN), else the first max.
    first_nan = tl.min(tl.where(is_nan, cols, num_cols), axis=0)
    numbers = tl.where(is_nan, float("-inf"), x)
    best = tl.max(numbers, axis=0)
    arg = chunk * CHUNK + tl.argmax(numbers, axis=0, tie_break_left=True)
    has_nan = first_nan < num_cols
    out = row * num_chunks + chunk
    tl.store(max_ptr + out, tl.where(has_nan, float("nan"), best))
    tl.store(arg_ptr + out, tl.where(has_nan, first_nan, arg))


@triton.jit
def _row_argmax_kernel(max_ptr, arg_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr,
                       USE_GDC: tl.constexpr):
    if USE_GDC:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < num_chunks
    best = tl.load(max_ptr + row * num_chunks + c, mask=c_ok, other=float("-inf"))
    arg = tl.load(arg_ptr + row * num_chunks + c, mask=c_ok, other=0)
    is_nan = (best != best) & c_ok
    # Chunks are in column order: the first NaN chunk, else the first chunk at the max.
    nan_chunk = tl.min(tl.where(is_nan, c, BLOCK_C), axis=0)
    max_chunk = tl.argmax(tl.where(is_nan, float("-inf"), best), axis=0, tie_break_left=True)
    pick = tl.where(nan_chunk < BLOCK_C, nan_chunk, max_chunk)
    tl.store(out_ptr + row, tl.sum(tl.where(c == pick, arg, 0), axis=0).to(tl.int64))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, dim=-1)`` of ``[B, V]`` logits (V > 0) as ``[B]`` int64."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    num_rows, num_cols = logits.shape
    if num_cols == 0:
        raise ValueError("logits must have at least one column.")
    if num_cols >= 2 ** 31:
        raise ValueError(f"logits must have fewer than 2**31 columns, got {num_cols}.")
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    chunk = min(_INTERPRETER_CHUNK if is_interpreter() else _CHUNK, next_power_of_2(num_cols))
    num_chunks = triton.cdiv(num_cols, chunk)
    chunk_max = torch.empty(num_rows * num_chunks, dtype=torch.float32, device=logits.device)
    chunk_arg = torch.empty(num_rows * num_chunks, dtype=torch.int32, device=logits.device)
    pdl = launch_dependent_args(logits.device)
    _chunk_argmax_kernel[(num_rows, num_chunks)](
        logits, chunk_max, chunk_arg, logits.stride(0), num_cols, num_chunks, CHUNK=chunk,
        num_warps=4, **pdl)
    _row_argmax_kernel[(num_rows,)](chunk_max, chunk_arg, out, num_chunks,
                                    BLOCK_C=max(2, next_power_of_2(num_chunks)), num_warps=1,
                                    **pdl)
    return out
