"""What the Gluon kernels share (``kernels.fp8_decode_attention``, ``kernels.fp8_mma_gemv``):
the Gluon import (None on a Triton without it), names that moved between Triton releases,
the one-warp ``mma.sync`` layouts, the layout that hands each thread runs of 32 elements of
a 128-wide reduction dim, and the relabelling that makes those runs its operand fragments.

The idea both kernels rest on: an MMA operand layout wants, per thread, pairs of
consecutive indices of the reduction dim spread over the tile, but a reduction may run in
any order. So a tile is loaded with each thread holding 32 *consecutive* elements (two or
four 16-byte vectors) and the reduction dim's index bits are then permuted (``relabel_k``,
a reshape and a permute: no data moves) until those registers are exactly the thread's
fragments; ``convert_layout(..., assert_trivial=True)`` in the kernels checks that at
compile time.
"""

from __future__ import annotations

import torch

from kernels._utils import capability, is_interpreter

try:  # Gluon: Triton 3.5+
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
except ImportError:  # pragma: no cover - an older Triton: the callers keep other kernels
    gluon = gl = async_copy = mma_v2 = None

# The reduction width relabel_k permutes, and RUNS_LANES' split of it.
RUN_K = 128


def runs_on(device: torch.device, hopper_only: bool = False) -> bool:
    """Whether the Gluon kernels can run on ``device``: Gluon present, not Triton's CPU
    interpreter, a CUDA GPU of compute capability 9.0+ (where they were measured); with
    ``hopper_only`` (a kernel of Hopper's own instructions, ``wgmma`` and ``setmaxnreg``,
    which later architectures lack) 9.x only."""
    if gluon is None or is_interpreter() or device.type != "cuda":
        return False
    major = capability(device)[0]
    return major == 9 if hopper_only else major >= 9


def mma_layouts() -> dict:
    """One warp's ``mma.sync`` m16n8k16 accumulator (``MMA``) and 16-bit operand layouts
    (``A_OP``, ``B_OP``)."""
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    return dict(MMA=mma, A_OP=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
                B_OP=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2))


def runs_layout(rows: int, first_rows: int = 8) -> gl.DistributedLinearLayout:
    """``[rows, 128]``: thread (g, t) of lane 4g + t holds row g (and g + 8, g + 16, ...
    past ``first_rows`` = 8) and elements 32t..32t+31 of the row; after ``relabel_k`` its
    registers are its fragments of an MMA operand whose reduction dim is the row's."""
    row_bits = [[1 << b, 0] for b in range(3, rows.bit_length() - 1)]
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 16]] + row_bits,
        lane_bases=[[0, 32], [0, 64], [1, 0], [2, 0], [4, 0]],
        warp_bases=[], block_bases=[], shape=[rows, RUN_K])


if gluon is not None:
    # Triton 3.5-3.6 name the cp.async builtin async_copy_global_to_shared, later ones
    # async_load; the CTA barrier thread_barrier, later ones barrier.
    async_load = getattr(async_copy, "async_load", None) \
        or async_copy.async_copy_global_to_shared
    barrier = getattr(gl, "thread_barrier", None) or gl.barrier

    @gluon.jit
    def relabel_k(x):
        """``[R, 128]`` with index ``d = c + 2a + 32b`` (c < 2, a < 16, b < 4) along dim 1 as
        ``c + 2b + 8a``: ``runs_layout``'s 32 consecutive elements of a thread become its
        operand fragments (the same relabelling must meet both operands of a product)."""
        R: gl.constexpr = x.shape[0]
        return gl.reshape(gl.permute(gl.reshape(x, [R, 4, 16, 2]), [0, 2, 1, 3]), [R, 128])

    @gluon.jit
    def gdc_wait():
        """Programmatic dependent launch: wait until the previous kernel's writes are
        visible."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def gdc_launch_dependents():
        """Programmatic dependent launch: the next kernel's programs may be scheduled."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)
