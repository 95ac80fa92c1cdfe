"""A step's small device-side input moves, one launch each.

Between two decode steps the GPU ran, besides the staged inputs' one host copy, eight
small operations in a row (H100 trace of a batch-1 step: an index, a cast and an index_put
for the tokens the last step sampled, a cast and four device copies into the CUDA graph's
static inputs), 3.2-5.2 us each end to end, and the host paid ~10-30 us of torch dispatch
for each. Here they are two kernels:

- ``scatter_sampled``: ``input_ids[dst] = sampled[src]`` (the tokens sampled last step,
  still on the device, become this step's inputs);
- ``decode_graph_inputs``: a decode batch's ids, positions, slots, context lengths and
  block-table rows into the graph's static buffers, and the padding rows past the batch
  (slot -1, context 0) in the same launch.

No integer argument or pointer alignment is specialised on (a count of 1 or one divisible
by 16, or a view at an odd offset, would compile another variant mid-serving), so each
kernel has one variant per dtype set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import INDEX_DTYPES, check_tensor

_BLOCK = 1024  # pending tokens a program moves
_BLOCK_W = 256  # block-table entries a program copies at a time
_GRAPH_INPUT_POINTERS = [f"{prefix}{name}_ptr" for prefix in ("", "graph_")
                         for name in ("ids", "positions", "slots", "seq_lens", "table")]


@triton.jit(do_not_specialize=["num_pending"],
            do_not_specialize_on_alignment=["ids_ptr", "dst_ptr", "src_ptr", "sampled_ptr"])
def _scatter_sampled_kernel(ids_ptr, dst_ptr, src_ptr, sampled_ptr, num_pending,
                            BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < num_pending
    dst = tl.load(dst_ptr + offs, mask=ok, other=0)
    src = tl.load(src_ptr + offs, mask=ok, other=0)
    token = tl.load(sampled_ptr + src, mask=ok, other=0)
    tl.store(ids_ptr + dst, token.to(ids_ptr.dtype.element_ty), mask=ok)


def scatter_sampled(input_ids: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
                    sampled: torch.Tensor) -> None:
    """``input_ids[dst] = sampled[src]`` in place (cast to ``input_ids``' dtype).

    Args:
        input_ids: ``[T]`` int32/int64 token ids of the step.
        dst: ``[P]`` int32/int64 rows of ``input_ids`` (distinct) to fill.
        src: ``[P]`` int32/int64 rows of ``sampled`` they take.
        sampled: ``[B]`` int32/int64 tokens the last step sampled.
    """
    for name, t in (("input_ids", input_ids), ("dst", dst), ("src", src),
                    ("sampled", sampled)):
        check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES, device=input_ids.device,
                     contiguous=True)
    if dst.shape != src.shape:
        raise ValueError(f"dst and src must have the same shape, got {tuple(dst.shape)} "
                         f"and {tuple(src.shape)}.")
    num_pending = dst.shape[0]
    if num_pending:
        _scatter_sampled_kernel[(triton.cdiv(num_pending, _BLOCK),)](
            input_ids, dst, src, sampled, num_pending, BLOCK=_BLOCK, num_warps=4)


@triton.jit(do_not_specialize=["table_stride", "graph_table_stride", "num_reqs", "width"],
            do_not_specialize_on_alignment=_GRAPH_INPUT_POINTERS)
def _decode_graph_inputs_kernel(ids_ptr, positions_ptr, slots_ptr, seq_lens_ptr, table_ptr,
                                table_stride, graph_ids_ptr, graph_positions_ptr,
                                graph_slots_ptr, graph_seq_lens_ptr, graph_table_ptr,
                                graph_table_stride, num_reqs, width, BLOCK_W: tl.constexpr):
    row = tl.program_id(0)
    if row < num_reqs:
        tl.store(graph_ids_ptr + row,
                 tl.load(ids_ptr + row).to(graph_ids_ptr.dtype.element_ty))
        tl.store(graph_positions_ptr + row,
                 tl.load(positions_ptr + row).to(graph_positions_ptr.dtype.element_ty))
        tl.store(graph_slots_ptr + row,
                 tl.load(slots_ptr + row).to(graph_slots_ptr.dtype.element_ty))
        tl.store(graph_seq_lens_ptr + row,
                 tl.load(seq_lens_ptr + row).to(graph_seq_lens_ptr.dtype.element_ty))
        src = table_ptr + row.to(tl.int64) * table_stride
        dst = graph_table_ptr + row.to(tl.int64) * graph_table_stride
        for start in range(0, width, BLOCK_W):
            cols = start + tl.arange(0, BLOCK_W)
            ok = cols < width
            blocks = tl.load(src + cols, mask=ok)
            tl.store(dst + cols, blocks.to(graph_table_ptr.dtype.element_ty), mask=ok)
    else:  # a padding row of the captured size: writes nothing to the cache, reads nothing
        tl.store(graph_slots_ptr + row, tl.full((), -1, graph_slots_ptr.dtype.element_ty))
        tl.store(graph_seq_lens_ptr + row, tl.zeros((), graph_seq_lens_ptr.dtype.element_ty))


def decode_graph_inputs(inputs: dict[str, torch.Tensor], graph: dict[str, torch.Tensor],
                        size: int) -> None:
    """Copy a decode batch's inputs into a CUDA graph's static buffers, one launch.

    Rows ``[0, B)`` take ``inputs``' values (``block_tables``' first ``W`` columns of each
    row); rows ``[B, size)`` are padding: slot -1 and context length 0 (their other
    entries are left as they are: a padding row reads no cache and writes none).

    Args:
        inputs: ``input_ids``, ``positions``, ``slot_mapping``, ``seq_lens`` (``[B]``) and
            ``block_tables`` (``[B, W]``, last dim contiguous), int32/int64.
        graph: the same names, ``[N]`` and ``[N, W']`` with ``W <= W'`` and
            ``B <= size <= N``, contiguous.
        size: the rows the graph replays.
    """
    names = ("input_ids", "positions", "slot_mapping", "seq_lens")
    for name in (*names, "block_tables"):
        check_tensor(f"inputs[{name!r}]", inputs.get(name), dtypes=INDEX_DTYPES,
                     ndim=2 if name == "block_tables" else 1, last_dim_contiguous=True)
        check_tensor(f"graph[{name!r}]", graph.get(name), dtypes=INDEX_DTYPES,
                     ndim=2 if name == "block_tables" else 1, contiguous=True,
                     device=inputs["input_ids"].device)
    num_reqs, width = inputs["block_tables"].shape
    capacity, graph_width = graph["block_tables"].shape
    for name in names:
        if inputs[name].shape[0] != num_reqs:
            raise ValueError(f"inputs[{name!r}] must have {num_reqs} rows, got "
                             f"{inputs[name].shape[0]}.")
        if graph[name].shape[0] != capacity:
            raise ValueError(f"graph[{name!r}] must have {capacity} rows, got "
                             f"{graph[name].shape[0]}.")
    if not num_reqs <= size <= capacity:
        raise ValueError(f"size must be in [{num_reqs}, {capacity}], got {size}.")
    if width > graph_width:
        raise ValueError(f"inputs['block_tables'] is {width} wide, past the graph's "
                         f"{graph_width}.")
    if size:
        _decode_graph_inputs_kernel[(size,)](
            inputs["input_ids"], inputs["positions"], inputs["slot_mapping"],
            inputs["seq_lens"], inputs["block_tables"], inputs["block_tables"].stride(0),
            graph["input_ids"], graph["positions"], graph["slot_mapping"],
            graph["seq_lens"], graph["block_tables"], graph_width, num_reqs, width,
            BLOCK_W=_BLOCK_W, num_warps=1)
