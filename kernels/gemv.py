"""``y = (x @ W^T) * s + b`` for one to four rows of ``x``: decode's linear layers.

At these sizes a linear layer is the time to read ``W`` once; cuBLAS reaches that for the
wide gate/up and LM-head matrices but not for the smaller q/k/v and o shapes (several
waves of a tile kernel, then a split-K reduction launch). This kernel is a plain
multiply-add over the weight: each program owns ``BLOCK_N`` output channels, streams their
weight rows along K in ``[BLOCK_N, BLOCK_K]`` tiles (converted to float32 in registers:
bf16, fp16, fp32 or e4m3 weights; the next tile requested before the current one is used),
keeps one float32 partial per element of the tile and sums it once at the end, so the loop
is loads and FMAs only. ``SPLIT_K > 1`` spreads K over that many programs per column block
to keep every SM streaming when N is small; their float32 partials are added in split
order by the last program of the block (a counter per block, reset by that program), so
the result does not depend on which program finished first and a second launch gives the
same bits.

With programmatic dependent launch (``kernels._utils.launch_dependent_args``) the programs
start while the previous kernel finishes: they request their first weight tile (the step
never writes a weight), then wait for that kernel before reading ``x``. ``silu_out`` gives
the gated MLP's gate/up projection ``silu(gate) * up`` in its epilogue, and
``rms_norm_gemv`` takes the add-and-norm before a projection into its reads of ``x``.
On an H200 it beats cuBLAS at one row and loses from two (each row adds an FMA per weight
element; see docs/performance.md), so the model runs it for one row only.

One bfloat16 row times an e4m3 weight with scales (``quantization="fp8"`` at batch 1) runs
``_gemv_e4m3_kernel`` instead: the weight read as 32-bit words of four e4m3 and x as 64-bit
words of four bfloat16, both in one register layout (no tile of x moved through shared
memory), and the four values of a word converted half by the conversion unit, half by
integer ops (see ``_e4m3_quad``): the conversions, not the bytes, bound the byte-wise kernel.
``_gemv_e4m3_f16_kernel`` multiplies in float16 pairs instead (about 2.6 instructions a
weight byte against 4.45, compiled for sm_90); it serves only with ``GRIDLLM_GEMV_F16=1``
(or ``gemv(..., f16_pairs=True)``): measured on an H200 (2026-12-05, Llama-3-8B's four
linears x 32 at one row) it took 2.511 ms against the word kernel's 2.142 (66% / 77% of
copy), faster only on o (6.7 against 6.9 us), so fewer instructions a byte did not make it
faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import (
    FLOAT_DTYPES,
    FP8_WORDS,
    GEMV_F16,
    check_shape,
    check_tensor,
    gdc_launch_dependents,
    gdc_wait,
    is_interpreter,
    launch_dependent_args,
    num_sms,
    split_k_workspace,
)
from kernels.fp8 import FP8_DTYPE
from kernels.silu_and_mul import silu_and_mul, silu_mul

# Rows of x one launch takes; callers use a GEMM beyond.
MAX_ROWS = 4
WEIGHT_DTYPES = FLOAT_DTYPES + (FP8_DTYPE,)
# (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K); SPLIT_K 0: chosen from the shape.
Config = tuple[int, int, int, int, int]
# Programs per SM that keep enough weight bytes in flight (the split count aims for it).
_PROGRAMS_PER_SM = 4


@triton.jit
def _x_tile(ptrs, k_ok, res_ptrs, norm_w_ptrs, rstd, MASKED: tl.constexpr,
            NORM: tl.constexpr):
    """A tile of one row of x in float32. NORM: the tile is ``rms_norm(x + residual)``
    with the row's ``rstd``, rounded as ``kernels/rms_norm.py`` rounds it."""
    if MASKED:
        x = tl.load(ptrs, mask=k_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    if NORM:
        if MASKED:
            r = tl.load(res_ptrs, mask=k_ok, other=0.0)
            nw = tl.load(norm_w_ptrs, mask=k_ok, other=0.0)
        else:
            r = tl.load(res_ptrs)
            nw = tl.load(norm_w_ptrs)
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype).to(tl.float32)
        normed = (h * rstd).to(x.dtype).to(tl.float32)
        x = (normed * nw.to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _residual_rstd(x_ptr, res_ptr, res_out_ptr, num_in, eps, WRITES_SUM,
                   BLOCK_H: tl.constexpr):
    """``1 / rms(x + residual)`` over the whole row (one row): every program takes its norm;
    the one that ``WRITES_SUM`` also stores the sum, the next layer's residual."""
    hs = tl.arange(0, BLOCK_H)
    h_ok = hs < num_in
    h = (tl.load(x_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
         + tl.load(res_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
         ).to(x_ptr.dtype.element_ty)
    if WRITES_SUM:
        tl.store(res_out_ptr + hs, h, mask=h_ok)
    hf = h.to(tl.float32)
    return tl.rsqrt(tl.sum(hf * hf, axis=0) / num_in + eps)


@triton.jit
def _channels(pid, num_out, BLOCK_N: tl.constexpr, SILU_OUT: tl.constexpr):
    """A program's weight rows and which of them exist. SILU_OUT: the weight's rows are
    ``[gate | up]`` (``num_out = 2 * I``) and the program takes ``BLOCK_N // 2`` channels of
    each, interleaved (gate c, up c, gate c + 1, ...), so its epilogue has both halves of
    ``silu(gate) * up``."""
    js = tl.arange(0, BLOCK_N)
    if SILU_OUT:
        half = num_out // 2
        ch = pid * (BLOCK_N // 2) + js // 2
        col_ok = ch < half
        # Channels past the end read the last pair (never stored).
        cols = tl.minimum(ch, half - 1) + (js % 2) * half
    else:
        cols = pid * BLOCK_N + js
        col_ok = cols < num_out
    return cols, col_ok


@triton.jit
def _store_row(y_ptr, out, pid, cols, col_ok, num_out, BLOCK_N: tl.constexpr,
               SILU_OUT: tl.constexpr):
    """Stores one row's ``BLOCK_N`` float32 results in y's dtype; SILU_OUT: the
    ``BLOCK_N // 2`` values ``silu(gate) * up`` of the interleaved pairs
    (``kernels.silu_and_mul.silu_mul`` of the products rounded to y's dtype)."""
    if SILU_OUT:
        v = out.to(y_ptr.dtype.element_ty).to(tl.float32)
        g, u = tl.split(tl.reshape(v, [BLOCK_N // 2, 2]))
        chs = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(y_ptr + chs, silu_mul(g.to(y_ptr.dtype.element_ty), u.to(y_ptr.dtype.element_ty)),
                 mask=chs < num_out // 2)
    else:
        tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, partial_ptr, lock_ptr,
                 res_ptr, norm_w_ptr, res_out_ptr, eps,
                 num_out, num_in, stride_x, stride_w, stride_y,
                 ROWS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 EVEN_K: tl.constexpr, NORM: tl.constexpr, SILU_OUT: tl.constexpr,
                 BLOCK_H: tl.constexpr, USE_GDC: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols, col_ok = _channels(pid, num_out, BLOCK_N, SILU_OUT)
    # Columns past the end read the last row (never stored): the loads need no column mask.
    safe_cols = tl.minimum(cols, num_out - 1)
    ks = tl.arange(0, BLOCK_K)
    # This program's share of K: whole BLOCK_K tiles, the last share shorter.
    k_per_split = tl.cdiv(tl.cdiv(num_in, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, num_in)
    w_ptrs = w_ptr + safe_cols[:, None].to(tl.int64) * stride_w + (k_start + ks)[None, :]
    x_ptrs = x_ptr + k_start + ks
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    # The first weight tile is requested before waiting for the previous kernel (with
    # programmatic dependent launch): the weight is never written by the step, only x is.
    w_next = tl.load(w_ptrs, mask=((k_start + ks) < k_end)[None, :], other=0.0,
                     eviction_policy="evict_first")
    if USE_GDC:
        gdc_launch_dependents()
        gdc_wait()
    rstd = 0.0
    res_ptrs = x_ptrs
    norm_w_ptrs = x_ptrs
    if NORM:
        rstd = _residual_rstd(x_ptr, res_ptr, res_out_ptr, num_in, eps,
                              (pid == 0) & (pid_k == 0), BLOCK_H)
        res_ptrs = res_ptr + k_start + ks
        norm_w_ptrs = norm_w_ptr + k_start + ks
    for k0 in range(k_start, k_end, BLOCK_K):
        w = w_next.to(tl.float32)
        # The next tile's loads are issued before this tile's products (double buffering).
        w_ptrs += BLOCK_K
        if EVEN_K:
            # A mask uniform along K (k_end is a whole tile away or not): loads stay vectors.
            more = (tl.zeros([1, BLOCK_K], dtype=tl.int32) + (k0 + BLOCK_K)) < k_end
            w_next = tl.load(w_ptrs, mask=more, other=0.0, eviction_policy="evict_first")
            k_ok = more  # unused: the x tiles are read whole
        else:
            k_ok = (k0 + ks) < k_end
            w_next = tl.load(w_ptrs, mask=((k0 + BLOCK_K + ks) < k_end)[None, :], other=0.0,
                             eviction_policy="evict_first")
        acc0 += w * _x_tile(x_ptrs, k_ok, res_ptrs, norm_w_ptrs, rstd, not EVEN_K,
                            NORM)[None, :]
        if ROWS > 1:  # (NORM takes one row)
            acc1 += w * _x_tile(x_ptrs + stride_x, k_ok, x_ptrs, x_ptrs, rstd,
                                not EVEN_K, False)[None, :]
        if ROWS > 2:
            acc2 += w * _x_tile(x_ptrs + 2 * stride_x, k_ok, x_ptrs, x_ptrs, rstd,
                                not EVEN_K, False)[None, :]
        if ROWS > 3:
            acc3 += w * _x_tile(x_ptrs + 3 * stride_x, k_ok, x_ptrs, x_ptrs, rstd,
                                not EVEN_K, False)[None, :]
        x_ptrs += BLOCK_K
        res_ptrs += BLOCK_K
        norm_w_ptrs += BLOCK_K
    out0 = tl.sum(acc0, axis=1)
    out1 = tl.sum(acc1, axis=1)
    out2 = tl.sum(acc2, axis=1)
    out3 = tl.sum(acc3, axis=1)
    is_last = True
    if SPLIT_K > 1:
        # Each program leaves its float32 partials (ROWS planes of num_out); the last of a
        # column block's programs adds them in split order and resets the counter.
        base = partial_ptr + pid_k * (ROWS * num_out) + cols
        tl.store(base, out0, mask=col_ok)
        if ROWS > 1:
            tl.store(base + num_out, out1, mask=col_ok)
        if ROWS > 2:
            tl.store(base + 2 * num_out, out2, mask=col_ok)
        if ROWS > 3:
            tl.store(base + 3 * num_out, out3, mask=col_ok)
        tl.debug_barrier()
        count = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
        is_last = count == SPLIT_K - 1
        if is_last:
            out0 = tl.zeros([BLOCK_N], dtype=tl.float32)
            out1 = out0
            out2 = out0
            out3 = out0
            for split in range(SPLIT_K):
                # .cg: from L2, never a stale line of this SM's L1.
                base = partial_ptr + split * (ROWS * num_out) + cols
                out0 += tl.load(base, mask=col_ok, other=0.0, cache_modifier=".cg")
                if ROWS > 1:
                    out1 += tl.load(base + num_out, mask=col_ok, other=0.0,
                                    cache_modifier=".cg")
                if ROWS > 2:
                    out2 += tl.load(base + 2 * num_out, mask=col_ok, other=0.0,
                                    cache_modifier=".cg")
                if ROWS > 3:
                    out3 += tl.load(base + 3 * num_out, mask=col_ok, other=0.0,
                                    cache_modifier=".cg")
            tl.store(lock_ptr + pid, 0)
    if is_last:
        if HAS_SCALE:
            scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
            out0 = out0 * scale
            out1 = out1 * scale
            out2 = out2 * scale
            out3 = out3 * scale
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            out0 = out0 + bias
            out1 = out1 + bias
            out2 = out2 + bias
            out3 = out3 + bias
        _store_row(y_ptr, out0, pid, cols, col_ok, num_out, BLOCK_N, SILU_OUT)
        if ROWS > 1:
            _store_row(y_ptr + stride_y, out1, pid, cols, col_ok, num_out, BLOCK_N, SILU_OUT)
        if ROWS > 2:
            _store_row(y_ptr + 2 * stride_y, out2, pid, cols, col_ok, num_out, BLOCK_N,
                       SILU_OUT)
        if ROWS > 3:
            _store_row(y_ptr + 3 * stride_y, out3, pid, cols, col_ok, num_out, BLOCK_N,
                       SILU_OUT)


@triton.jit
def _bf16_quad(words):
    """int64 words of four bfloat16 each (little-endian) as four float32 tensors (exact:
    a bfloat16 is the top half of its float32)."""
    lo = words.to(tl.int32)
    hi = (words >> 32).to(tl.int32)
    return ((lo << 16).to(tl.float32, bitcast=True), (lo & -65536).to(tl.float32, bitcast=True),
            (hi << 16).to(tl.float32, bitcast=True), (hi & -65536).to(tl.float32, bitcast=True))


@triton.jit
def _round_bf16(x):
    return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _normed(x, res, norm_w, rstd):
    """``_x_tile``'s norm on float32 values, rounded as it rounds them."""
    return _round_bf16(_round_bf16(_round_bf16(x + res) * rstd) * norm_w)


@triton.jit
def _load_quad(ptrs, k_ok, MASKED: tl.constexpr):
    if MASKED:
        return _bf16_quad(tl.load(ptrs, mask=k_ok, other=0))
    return _bf16_quad(tl.load(ptrs))


@triton.jit
def _x_quad(ptrs, k_ok, res_ptrs, norm_w_ptrs, rstd, MASKED: tl.constexpr,
            NORM: tl.constexpr):
    """``_x_tile`` over words of four bfloat16: elements 4j..4j+3 of a tile of x."""
    x0, x1, x2, x3 = _load_quad(ptrs, k_ok, MASKED)
    if NORM:
        r0, r1, r2, r3 = _load_quad(res_ptrs, k_ok, MASKED)
        n0, n1, n2, n3 = _load_quad(norm_w_ptrs, k_ok, MASKED)
        x0 = _normed(x0, r0, n0, rstd)
        x1 = _normed(x1, r1, n1, rstd)
        x2 = _normed(x2, r2, n2, rstd)
        x3 = _normed(x3, r3, n3, rstd)
    return x0, x1, x2, x3


# 2^120: an e4m3 value v read by _e4m3_top_byte is v * 2^-120 (see there).
_E4M3_UNSCALE = tl.constexpr(2.0 ** 120)
# Sign bit and the seven bits below the float32 exponent's low four (0x87F00000 as int32).
_E4M3_F32_MASK = tl.constexpr(-0x78100000)


@triton.jit
def _e4m3_top_byte(t):
    """float32 ``v * 2^-120`` for the e4m3 value ``v`` in the top byte of the int32 ``t``
    (sign, 4 exponent bits, 3 mantissa bits), by integer ops: shifted down four bits
    (arithmetically, so the sign stays in bit 31) the exponent and mantissa land in the low
    bits of float32's exponent and the top of its mantissa, so the bits read as float32 are
    ``v`` times 2^(7 - 127), subnormals included (float32 denormals, which the kernels'
    float32 arithmetic keeps: no flush to zero)."""
    return ((t >> 4) & _E4M3_F32_MASK).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_quad(words, ASM: tl.constexpr):
    """int32 words of four e4m3 each (little-endian): bytes 0 and 1 as float32 ``v``, bytes
    2 and 3 as float32 ``v * 2^-120`` (all exact).

    The two halves go through different units, so neither bounds the kernel alone: bytes 0
    and 1 through the conversion unit (one ``cvt.rn.f16x2.e4m3x2``, two float16 -> float32;
    with ASM, CUDA), bytes 2 and 3 through integer ops (``_e4m3_top_byte``). Either way
    alone ran the FP8 GEMV at ~60% of copy bandwidth on an H200 (the conversion unit
    converts at a quarter of the integer ops' rate; integer ops take ~3 per element).
    Without ASM (Triton's CPU interpreter) bytes 0 and 1 also take integer ops, scaled back."""
    if ASM:
        w0, w1 = tl.inline_asm_elementwise(
            """{
            .reg .b16 lo, hi;
            .reg .b32 t;
            .reg .f16 a, b;
            mov.b32 {lo, hi}, $2;
            cvt.rn.f16x2.e4m3x2 t, lo;
            mov.b32 {a, b}, t;
            cvt.f32.f16 $0, a;
            cvt.f32.f16 $1, b;
            }""", "=r,=r,r", [words], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        w0 = _e4m3_top_byte(words << 24) * _E4M3_UNSCALE
        w1 = _e4m3_top_byte(words << 16) * _E4M3_UNSCALE
    return w0, w1, _e4m3_top_byte(words << 8), _e4m3_top_byte(words)


@triton.jit
def _row_words(ptr, words, BLOCK_N: tl.constexpr):
    """``[BLOCK_N, len(words)]`` pointers to 64-bit words ``words`` of the one row at
    ``ptr``, every row of the tile the same addresses (loaded once per thread)."""
    return ptr.to(tl.pointer_type(tl.int64), bitcast=True) \
        + tl.zeros([BLOCK_N, 1], dtype=tl.int32) + words[None, :]


@triton.jit
def _word_tiles(x_ptr, w_ptr, pid, pid_k, num_out, num_in, stride_w, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SILU_OUT: tl.constexpr):
    """A word kernel program's share: ``(cols, col_ok, js, j_start, j_end, w_ptrs,
    x_ptrs, first weight tile)``, its channels, its words ``j_start .. j_end`` of K (word j
    holds elements 4j..4j+3; num_in is a multiple of 4), the weight's int32 and x's int64
    word pointers of ``[BLOCK_N, BLOCK_K // 4]`` tiles, and its first weight tile, requested
    at once."""
    cols, col_ok = _channels(pid, num_out, BLOCK_N, SILU_OUT)
    safe_cols = tl.minimum(cols, num_out - 1)
    QUAD_K: tl.constexpr = BLOCK_K // 4
    js = tl.arange(0, QUAD_K)
    k_per_split = tl.cdiv(tl.cdiv(num_in, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, num_in)
    j_start = k_start // 4
    j_end = k_end // 4
    # Two weight words (8 bytes) per thread and load, as x's two words (16 bytes): a wider
    # weight vector would give the two tiles different layouts, and a conversion per tile.
    w_ptrs = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + tl.max_contiguous(
        safe_cols[:, None].to(tl.int64) * (stride_w // 4) + (j_start + js)[None, :], [1, 2])
    x_ptrs = _row_words(x_ptr, j_start + js, BLOCK_N)
    w_first = tl.load(w_ptrs, mask=((j_start + js) < j_end)[None, :], other=0,
                      eviction_policy="evict_first")
    return cols, col_ok, js, j_start, j_end, w_ptrs, x_ptrs, w_first


@triton.jit
def _gemv_e4m3_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, partial_ptr, lock_ptr,
                      res_ptr, norm_w_ptr, res_out_ptr, eps,
                      num_out, num_in, stride_w,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                      NORM: tl.constexpr, SILU_OUT: tl.constexpr, BLOCK_H: tl.constexpr,
                      ASM: tl.constexpr, USE_GDC: tl.constexpr):
    """``_gemv_kernel`` for one bfloat16 row and an e4m3 weight, read in words of four
    elements: the weight as int32 (four e4m3), x as int64 (four bfloat16), both ``[BLOCK_N,
    BLOCK_K // 4]`` tiles of one shape (x's rows all the same addresses, loaded once per
    thread), so the compiler gives them one register layout and moves no tile of x through
    shared memory."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    QUAD_K: tl.constexpr = BLOCK_K // 4
    cols, col_ok, js, j_start, j_end, w_ptrs, x_ptrs, w_next = _word_tiles(
        x_ptr, w_ptr, pid, pid_k, num_out, num_in, stride_w, BLOCK_N, BLOCK_K, SPLIT_K,
        SILU_OUT)
    # acc: bytes 0-1 of each word (true values); acc_scaled: bytes 2-3 (times 2^-120).
    acc = tl.zeros([BLOCK_N, QUAD_K], dtype=tl.float32)
    acc_scaled = acc
    if USE_GDC:
        gdc_launch_dependents()
        gdc_wait()
    rstd = 0.0
    res_ptrs = x_ptrs
    norm_w_ptrs = x_ptrs
    if NORM:
        rstd = _residual_rstd(x_ptr, res_ptr, res_out_ptr, num_in, eps,
                              (pid == 0) & (pid_k == 0), BLOCK_H)
        res_ptrs = _row_words(res_ptr, j_start + js, BLOCK_N)
        norm_w_ptrs = _row_words(norm_w_ptr, j_start + js, BLOCK_N)
    for j0 in range(j_start, j_end, QUAD_K):
        w0, w1, w2, w3 = _e4m3_quad(w_next, ASM)
        w_ptrs += QUAD_K
        w_next = _next_weights(w_ptrs, j0, j_end, js, QUAD_K, EVEN_K)
        k_ok = ((j0 + js) < j_end)[None, :]  # read only without EVEN_K
        x0, x1, x2, x3 = _x_quad(x_ptrs, k_ok, res_ptrs, norm_w_ptrs, rstd, not EVEN_K,
                                 NORM)
        acc += w0 * x0
        acc += w1 * x1
        acc_scaled += w2 * x2
        acc_scaled += w3 * x3
        x_ptrs += QUAD_K
        res_ptrs += QUAD_K
        norm_w_ptrs += QUAD_K
    out = tl.sum(acc, axis=1) + tl.sum(acc_scaled, axis=1) * _E4M3_UNSCALE
    _finish_row(out, pid, pid_k, cols, col_ok, scale_ptr, bias_ptr, y_ptr, partial_ptr,
                lock_ptr, num_out, HAS_BIAS, BLOCK_N, SPLIT_K, SILU_OUT)


@triton.jit
def _finish_row(out, pid, pid_k, cols, col_ok, scale_ptr, bias_ptr, y_ptr, partial_ptr,
                lock_ptr, num_out, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT_K: tl.constexpr, SILU_OUT: tl.constexpr):
    """A one-row kernel's epilogue: with split K, the last program of the column block adds
    the float32 partials in split order; then the scales, the bias and the store."""
    is_last = True
    if SPLIT_K > 1:
        base = partial_ptr + pid_k * num_out + cols
        tl.store(base, out, mask=col_ok)
        tl.debug_barrier()
        count = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
        is_last = count == SPLIT_K - 1
        if is_last:
            out = tl.zeros([BLOCK_N], dtype=tl.float32)
            for split in range(SPLIT_K):
                out += tl.load(partial_ptr + split * num_out + cols, mask=col_ok, other=0.0,
                               cache_modifier=".cg")
            tl.store(lock_ptr + pid, 0)
    if is_last:
        out = out * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        _store_row(y_ptr, out, pid, cols, col_ok, num_out, BLOCK_N, SILU_OUT)


@triton.jit
def _pow2_scale(amax):
    """``(s, 1 / s)``: powers of two with ``amax * s`` in [0.5, 1) (``s`` = 2^126 where
    ``amax`` is 0), elementwise."""
    e = tl.minimum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 252)
    return (((253 - e) << 23).to(tl.float32, bitcast=True),
            ((e + 1) << 23).to(tl.float32, bitcast=True))


@triton.jit
def _abs_max4(m, x0, x1, x2, x3):
    return tl.maximum(tl.maximum(m, tl.maximum(tl.abs(x0), tl.abs(x1))),
                      tl.maximum(tl.abs(x2), tl.abs(x3)))


@triton.jit
def _f16x2(lo, hi):
    """float32 ``lo``, ``hi`` as one word of two float16 (``lo`` in the low half)."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _e4m3_words_f16x2(words):
    """int32 words of four e4m3: bytes 0-1 and bytes 2-3 as words of two float16 each."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b16 lo, hi;
        mov.b32 {lo, hi}, $2;
        cvt.rn.f16x2.e4m3x2 $0, lo;
        cvt.rn.f16x2.e4m3x2 $1, hi;
        }""", "=r,=r,r", [words], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _hfma2(a, b, c):
    """``a * b + c`` on words of two float16 (one rounding a lane)."""
    return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _f16x2_sum(words):
    """The two float16 of each word, added in float32."""
    return tl.inline_asm_elementwise(
        """{
        .reg .f16 lo, hi;
        .reg .f32 a, b;
        mov.b32 {lo, hi}, $1;
        cvt.f32.f16 a, lo;
        cvt.f32.f16 b, hi;
        add.f32 $0, a, b;
        }""", "=f,r", [words], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _x_words(x_ptrs, jt, j_end, js, EVEN_K: tl.constexpr):
    """Words ``jt .. jt + QUAD_K`` of x (zeros past ``j_end``; EVEN_K: none is) as four
    float32 tensors."""
    if EVEN_K:
        return _bf16_quad(tl.load(x_ptrs))
    return _bf16_quad(tl.load(x_ptrs, mask=((jt + js) < j_end)[None, :], other=0))


@triton.jit
def _f16_products(chain_lo, chain_hi, w, x0, x1, x2, x3, x_scale, ASM: tl.constexpr):
    """One tile's four products a weight word added to the float16 chains: with ASM one
    word of two lanes (``chain_lo``), else a float16 tensor a lane."""
    if ASM:
        w01, w23 = _e4m3_words_f16x2(w)
        chain_lo = _hfma2(w01, _f16x2(x0 * x_scale, x1 * x_scale), chain_lo)
        chain_lo = _hfma2(w23, _f16x2(x2 * x_scale, x3 * x_scale), chain_lo)
    else:
        w0, w1, w2, w3 = _e4m3_quad(w, False)
        chain_lo += w0.to(tl.float16) * (x0 * x_scale).to(tl.float16)
        chain_hi += w1.to(tl.float16) * (x1 * x_scale).to(tl.float16)
        chain_lo += (w2 * _E4M3_UNSCALE).to(tl.float16) * (x2 * x_scale).to(tl.float16)
        chain_hi += (w3 * _E4M3_UNSCALE).to(tl.float16) * (x3 * x_scale).to(tl.float16)
    return chain_lo, chain_hi


@triton.jit
def _next_weights(w_ptrs, jt, j_end, js, QUAD_K: tl.constexpr, EVEN_K: tl.constexpr,
                  IN_GROUP: tl.constexpr = False):
    """The weight words of the tile after the one at ``jt`` (zeros past ``j_end``; EVEN_K:
    the tile is whole or wholly past it, and whole when IN_GROUP: within a group of four)."""
    if EVEN_K and IN_GROUP:
        return tl.load(w_ptrs, eviction_policy="evict_first")
    if EVEN_K:
        more = (tl.zeros([1, QUAD_K], dtype=tl.int32) + (jt + QUAD_K)) < j_end
        return tl.load(w_ptrs, mask=more, other=0, eviction_policy="evict_first")
    return tl.load(w_ptrs, mask=((jt + QUAD_K + js) < j_end)[None, :], other=0,
                   eviction_policy="evict_first")


@triton.jit
def _f16_tile(chain_lo, chain_hi, w_next, w_ptrs, jt, j_end, js, x0, x1, x2, x3, x_scale,
              QUAD_K: tl.constexpr, EVEN_K: tl.constexpr, IN_GROUP: tl.constexpr,
              ASM: tl.constexpr):
    """The tile at ``jt``: request the next tile's weights (``_next_weights``), then add
    this one's products to the chains; ``(chain_lo, chain_hi, w_next, w_ptrs)``."""
    w = w_next
    w_ptrs += QUAD_K
    w_next = _next_weights(w_ptrs, jt, j_end, js, QUAD_K, EVEN_K, IN_GROUP)
    chain_lo, chain_hi = _f16_products(chain_lo, chain_hi, w, x0, x1, x2, x3, x_scale, ASM)
    return chain_lo, chain_hi, w_next, w_ptrs


@triton.jit
def _gemv_e4m3_f16_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, partial_ptr, lock_ptr,
                          num_out, num_in, stride_w,
                          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                          EVEN_K: tl.constexpr, SILU_OUT: tl.constexpr, ASM: tl.constexpr,
                          USE_GDC: tl.constexpr):
    """``_gemv_e4m3_kernel`` with products in float16 pairs (EVEN_K: every program's
    share of K is whole groups of four tiles, read without masks). x is read four tiles at a
    time; each word position of the tile takes its own power-of-two scale from its 16
    values of those tiles (elementwise: no reduction across threads), putting them in
    (-1, 1). Each weight word becomes two words of float16 pairs
    (``cvt.rn.f16x2.e4m3x2``) multiplied with ``fma.rn.f16x2``, so a lane chains 8
    products (at most 448 * 8 in magnitude) before its sum, unscaled, joins a float32
    one: 2.1-2.6 SASS instructions a weight byte for sm_90 against the word kernel's
    4.3-4.5, at a third of bfloat16's output rounding more error (docs/performance.md).
    Without ASM (Triton's CPU interpreter) the same steps in float16 arithmetic, a tensor a
    lane."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    QUAD_K: tl.constexpr = BLOCK_K // 4
    cols, col_ok, js, j_start, j_end, w_ptrs, x_ptrs, w_next = _word_tiles(
        x_ptr, w_ptr, pid, pid_k, num_out, num_in, stride_w, BLOCK_N, BLOCK_K, SPLIT_K,
        SILU_OUT)
    acc = tl.zeros([BLOCK_N, QUAD_K], dtype=tl.float32)
    if USE_GDC:
        gdc_launch_dependents()
        gdc_wait()
    for j0 in range(j_start, j_end, 4 * QUAD_K):
        a0, a1, a2, a3 = _x_words(x_ptrs, j0, j_end, js, EVEN_K)
        b0, b1, b2, b3 = _x_words(x_ptrs + QUAD_K, j0 + QUAD_K, j_end, js, EVEN_K)
        c0, c1, c2, c3 = _x_words(x_ptrs + 2 * QUAD_K, j0 + 2 * QUAD_K, j_end, js, EVEN_K)
        d0, d1, d2, d3 = _x_words(x_ptrs + 3 * QUAD_K, j0 + 3 * QUAD_K, j_end, js, EVEN_K)
        x_ptrs += 4 * QUAD_K
        m = _abs_max4(tl.zeros([BLOCK_N, QUAD_K], dtype=tl.float32), a0, a1, a2, a3)
        m = _abs_max4(_abs_max4(_abs_max4(m, b0, b1, b2, b3), c0, c1, c2, c3), d0, d1, d2, d3)
        x_scale, x_unscale = _pow2_scale(m)
        if ASM:
            chain_lo = tl.zeros([BLOCK_N, QUAD_K], dtype=tl.int32)  # two float16 zeros
            chain_hi = chain_lo
        else:
            chain_lo = tl.zeros([BLOCK_N, QUAD_K], dtype=tl.float16)
            chain_hi = chain_lo
        chain_lo, chain_hi, w_next, w_ptrs = _f16_tile(
            chain_lo, chain_hi, w_next, w_ptrs, j0, j_end, js, a0, a1, a2, a3, x_scale,
            QUAD_K, EVEN_K, True, ASM)
        chain_lo, chain_hi, w_next, w_ptrs = _f16_tile(
            chain_lo, chain_hi, w_next, w_ptrs, j0 + QUAD_K, j_end, js, b0, b1, b2, b3,
            x_scale, QUAD_K, EVEN_K, True, ASM)
        chain_lo, chain_hi, w_next, w_ptrs = _f16_tile(
            chain_lo, chain_hi, w_next, w_ptrs, j0 + 2 * QUAD_K, j_end, js, c0, c1, c2, c3,
            x_scale, QUAD_K, EVEN_K, True, ASM)
        # The last tile's next is the next group's first: maybe past the share.
        chain_lo, chain_hi, w_next, w_ptrs = _f16_tile(
            chain_lo, chain_hi, w_next, w_ptrs, j0 + 3 * QUAD_K, j_end, js, d0, d1, d2, d3,
            x_scale, QUAD_K, EVEN_K, False, ASM)
        if ASM:
            acc += _f16x2_sum(chain_lo) * x_unscale
        else:
            acc += (chain_lo.to(tl.float32) + chain_hi.to(tl.float32)) * x_unscale
    _finish_row(tl.sum(acc, axis=1), pid, pid_k, cols, col_ok, scale_ptr, bias_ptr, y_ptr,
                partial_ptr, lock_ptr, num_out, HAS_BIAS, BLOCK_N, SPLIT_K, SILU_OUT)


# The float16-pair kernel's launch for every shape: 8 channels by 1024 keys on 2 warps, its
# fewest instructions a weight byte compiled for sm_90 (2.1, against 2.6 with 4 channels
# and 3.8 with 2 on 4 warps, where x's share of the work grows), not yet measured.
F16_CONFIG: Config = (8, 1024, 2, 1, 0)


def config_for(num_out: int, num_in: int, weight_bytes: int = 2, fused: bool = False
               ) -> Config:
    """16-bit weights: four output channels per program (the most programs: the shortest
    tail), in tiles of 1024 along K for a wide output (q/k/v, gate/up, the LM head), else 512
    (o, down): the best or within 2% of the best of a sweep over the Llama-3-8B shapes on an
    H200. e4m3 weights, tiles of 1024 along K: with a fused norm (``fused``: each program
    computes the row's norm) eight channels and 2 warps, else four channels and 2 warps for
    a wide output, two and 4 warps otherwise (H200, Llama-3-8B, one row: q/k/v + norm 11.3,
    gate/up + norm 42.7 us against 14.0 and 42.0 with 16 channels by 512 and 4 warps; unfused
    q/k/v 8.2, o 6.9, gate/up 32.8, down 16.5 us, which is why the model runs the norm kernel
    before an e4m3 projection instead). In Triton's CPU interpreter: 32 channels, fewer
    programs to step through."""
    if is_interpreter():
        return (32, 256, 4, 1, 0)
    if weight_bytes == 1:
        if fused:
            return (8, 1024, 2, 1, 0)
        return (4, 1024, 2, 1, 0) if num_out > num_in else (2, 1024, 4, 1, 0)
    return (4, 1024 if num_out > num_in else 512, 4, 1, 0)


def split_k_for(num_out: int, num_in: int, block_n: int, block_k: int,
                device: torch.device) -> int:
    """Splits of K per column block so that about ``_PROGRAMS_PER_SM`` programs per SM
    stream the weight, each keeping at least two tiles of K."""
    blocks = triton.cdiv(num_out, block_n)
    wanted = triton.cdiv(_PROGRAMS_PER_SM * num_sms(device), blocks)
    return max(1, min(wanted, num_in // (2 * block_k)))


def _reads_words(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                 norm_weight: torch.Tensor, num_in: int) -> bool:
    """Whether ``_gemv_e4m3_kernel`` takes the product: one bfloat16 row, an e4m3 weight
    with scales, whole words of four along K, every operand aligned to its word."""
    return (FP8_WORDS and weight.dtype == FP8_DTYPE and x.dtype == torch.bfloat16
            and x.shape[0] == 1 and num_in % 4 == 0 and weight.stride(0) % 4 == 0
            and weight.data_ptr() % 4 == 0
            and all(t.data_ptr() % 8 == 0 for t in (x, residual, norm_weight)))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         weight_scale: torch.Tensor | None = None, config: Config | None = None,
         silu_out: bool = False, f16_pairs: bool | None = None) -> torch.Tensor:
    """``x @ (weight * weight_scale[:, None])^T + bias`` in ``x``'s dtype, float32 sums.

    Args:
        x: ``[M, K]`` activations, ``1 <= M <= MAX_ROWS``, last dim contiguous.
        weight: ``[N, K]`` bf16, fp16, fp32 or float8_e4m3fn, last dim contiguous.
        bias: ``[N]`` or None.
        weight_scale: ``[N]`` float32 per output channel, or None.
        config: ``(BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K)``; default
            ``config_for`` the shape; SPLIT_K 0 picks the split count from the shape and the
            SM count (``split_k_for``).
        silu_out: the weight's rows are ``[gate | up]`` (the gated MLP's gate/up projection,
            N even) and the result is ``silu_and_mul`` of the product, ``[M, N // 2]``: the
            activation fused into the projection before it (the same values as
            ``kernels.silu_and_mul`` of the unfused result), so the down projection reads
            a finished input.
        f16_pairs: one bfloat16 row times an e4m3 weight in float16 pairs
            (``_gemv_e4m3_f16_kernel``); None: as ``GRIDLLM_GEMV_F16`` says (off by
            default).
    Returns:
        ``[M, N]`` in ``x.dtype`` (``[M, N // 2]`` with ``silu_out``).
    Raises:
        ValueError: an argument of the wrong shape, dtype or device, naming it.
    """
    return _launch(x, weight, bias, weight_scale, config, None, silu_out,
                   GEMV_F16 if f16_pairs is None else f16_pairs)[0]


def rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                  eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  weight_scale: torch.Tensor | None = None, config: Config | None = None,
                  silu_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``gemv(rms_norm(x + residual) * norm_weight, ...)`` for one row, and ``x + residual``
    (the next residual): the decoder's add-and-norm fused into the projection after it, with
    the values of ``kernels.rms_norm.rms_norm(x, norm_weight, eps, residual)``.

    Args:
        x, residual: ``[1, K]`` of one dtype, last dim contiguous.
        norm_weight: ``[K]`` of x's dtype.
        eps: the norm's epsilon.
        weight, bias, weight_scale, config, silu_out: as for ``gemv``.
    Returns:
        ``(y [1, N], x + residual [1, K])`` (y ``[1, N // 2]`` with ``silu_out``);
        ``residual`` is not written.
    Raises:
        ValueError: an argument of the wrong shape, dtype or device, naming it.
    """
    check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=x.device,
                 last_dim_contiguous=True)
    check_shape("residual", residual, tuple(x.shape))
    check_tensor("norm_weight", norm_weight, ndim=1, dtypes=(x.dtype,), device=x.device,
                 contiguous=True)
    check_shape("norm_weight", norm_weight, (x.shape[-1],))
    if x.shape[0] != 1:
        raise ValueError(f"x must have 1 row for the fused norm, got {x.shape[0]}.")
    return _launch(x, weight, bias, weight_scale, config,
                   (residual, norm_weight, float(eps)), silu_out)


def _launch(x, weight, bias, weight_scale, config, norm, silu_out, f16_pairs=False):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor("weight", weight, ndim=2, dtypes=WEIGHT_DTYPES, device=x.device,
                 last_dim_contiguous=True)
    num_rows, num_in = x.shape
    num_out = weight.shape[0]
    if not 1 <= num_rows <= MAX_ROWS:
        raise ValueError(f"x must have 1 to {MAX_ROWS} rows, got {num_rows}.")
    check_shape("weight", weight, (num_out, num_in))
    if weight_scale is not None:
        check_tensor("weight_scale", weight_scale, dtypes=(torch.float32,), device=x.device,
                     contiguous=True)
        check_shape("weight_scale", weight_scale, (num_out,))
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, device=x.device, contiguous=True)
        check_shape("bias", bias, (num_out,))
    if silu_out and num_out % 2:
        raise ValueError(f"weight must have an even number of rows (gate | up) for "
                         f"silu_out, got {num_out}.")
    y = torch.empty((num_rows, num_out // 2 if silu_out else num_out), dtype=x.dtype,
                    device=x.device)
    residual_out = None
    if norm is not None:
        residual_out = torch.empty_like(x)
        if num_in == 0 or num_out == 0:  # nothing to launch: the sum alone
            residual_out = (x.float() + norm[0].float()).to(x.dtype)
    if num_out == 0:
        return y, residual_out
    if num_in == 0:
        if silu_out:
            product = torch.zeros((num_rows, num_out), dtype=x.dtype, device=x.device)
            return silu_and_mul(product if bias is None else product.copy_(
                bias.expand_as(product))), residual_out
        return (y.zero_() if bias is None else y.copy_(bias.expand_as(y))), residual_out
    residual, norm_weight, eps = norm if norm is not None else (x, x, 0.0)
    reads_words = weight_scale is not None and _reads_words(x, weight, residual, norm_weight,
                                                            num_in)
    f16_pairs = f16_pairs and reads_words and norm is None
    default = F16_CONFIG if f16_pairs and not is_interpreter() else config_for(
        num_out, num_in, weight.element_size(), fused=norm is not None)
    block_n, block_k, num_warps, num_stages, split_k = config or default
    block_k = min(block_k, triton.next_power_of_2(num_in))
    if split_k == 0:
        split_k = split_k_for(num_out, num_in, block_n, block_k, x.device)
    if silu_out and block_n % 2:
        raise ValueError(f"config's BLOCK_N must be even for silu_out, got {block_n}.")
    num_blocks = triton.cdiv(num_out, block_n)
    partial, locks = split_k_workspace(split_k, num_rows, num_out, block_n, y)
    k_per_split = triton.cdiv(triton.cdiv(num_in, split_k), block_k) * block_k
    if f16_pairs:
        # Tiles of K that make each program's share whole groups of four, where one of
        # up to a quarter of the size does (Llama's 14336 = 28 x 512).
        for tile in (block_k, block_k // 2, block_k // 4):
            share = triton.cdiv(triton.cdiv(num_in, split_k), tile) * tile
            if tile >= 16 and num_in % share == 0 and share % (4 * tile) == 0:
                block_k, k_per_split = tile, share
                break
        _gemv_e4m3_f16_kernel[(num_blocks, split_k)](
            x, weight, weight_scale, bias if bias is not None else y, y, partial, locks,
            num_out, num_in, weight.stride(0), HAS_BIAS=bias is not None,
            BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
            EVEN_K=num_in % k_per_split == 0 and k_per_split % (4 * block_k) == 0,
            SILU_OUT=silu_out, ASM=not is_interpreter(), num_warps=num_warps,
            num_stages=num_stages, **launch_dependent_args(x.device))
        return y, residual_out
    if reads_words:
        _gemv_e4m3_kernel[(num_blocks, split_k)](
            x, weight, weight_scale, bias if bias is not None else y, y, partial, locks,
            residual, norm_weight, residual_out if residual_out is not None else x, eps,
            num_out, num_in, weight.stride(0), HAS_BIAS=bias is not None,
            BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
            EVEN_K=num_in % k_per_split == 0, NORM=norm is not None,
            SILU_OUT=silu_out, BLOCK_H=triton.next_power_of_2(num_in) if norm is not None else 1,
            ASM=not is_interpreter(), num_warps=num_warps, num_stages=num_stages,
            **launch_dependent_args(x.device))
        return y, residual_out
    _gemv_kernel[(num_blocks, split_k)](
        x, weight, weight_scale if weight_scale is not None else y,
        bias if bias is not None else y, y, partial, locks,
        residual, norm_weight, residual_out if residual_out is not None else x, eps,
        num_out, num_in, x.stride(0), weight.stride(0), y.stride(0),
        ROWS=num_rows, HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        EVEN_K=num_in % k_per_split == 0, NORM=norm is not None,
        SILU_OUT=silu_out, BLOCK_H=triton.next_power_of_2(num_in) if norm is not None else 1,
        num_warps=num_warps, num_stages=num_stages, **launch_dependent_args(x.device))
    return y, residual_out
