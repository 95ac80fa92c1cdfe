"""Fused sampling: logit bias, penalties, temperature, min-p/top-k/top-p, greedy, seeded draws.

No pass sorts the vocabulary. Top-k and top-p become value thresholds found by a 16-way
radix search over the order-preserving int32 image of the fp32 logits: each pass counts
(top-k) or sums the probability mass (top-p) of the logits at or above 16 pivots and
narrows the key range 16x, so 8 passes always find the exact threshold (ties at the top-k
threshold are all kept, as in ``torch_ref.filter_logits``). 16-bit logits read in place
(no bias, no penalties: ``x = logit / T``, a non-decreasing map) are searched over the
16-bit image of the logits themselves, whose order is ``x``'s: 4 passes a search find the
same threshold, so the kept tokens are the same. Every pass is a grid of
(row, vocab chunk) programs that add their partial sums atomically, so the whole GPU
streams the logits; the launches depend on host arguments only (CUDA-graph friendly, no
host sync).
Work shrinks as the search narrows: a pass skips every chunk and every 256-token sub-block
whose max (recorded by the first pass) is below the lowest pivot, and rows that converged
(top-k off converges at once) skip their passes; a search that no row of the batch needs
(the caller says so: ``no_top_k``, ``no_top_p``) launches its first pass only. In a grid
of few programs an SM every chunk is loaded whole at once (no load waits on another); in
a larger one the top-k passes read a chunk's live sub-blocks in turn, and the top-p
passes and the draw load a mostly live chunk whole and read a mostly dead one by its live
sub-blocks.
Without a bias or penalties the passes re-read the logits (16-bit as the LM head writes
them) instead of a float32 workspace.
The draw is a Gumbel-max over the survivors with Philox noise keyed by a per-row seed and
offset (one Philox counter serves four tokens), so it is reproducible per request.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, is_interpreter, num_sms

# Below this temperature a row is greedy (SamplingParams' threshold).
GREEDY_TEMPERATURE = 1e-5
# Pivots per radix pass: 16 (4 bits a pass) keeps the compare matrix in registers;
# 8 passes cover the 32-bit key space (4 the 16-bit one).
_NUM_PIVOTS = 16
_NUM_PASSES = 8
# Programs an SM up to which every chunk loads whole (all its loads in flight at once):
# so few leave the SMs waiting on memory latency; past it chunks read their live
# sub-blocks in turn (see ``_loads_whole``), skipping the others' arithmetic.
_WHOLE_PROGRAMS_PER_SM = 4


def _chunk_sizes() -> tuple[int, int]:
    """Tokens a program's chunk (4K: B * 32 programs a pass at a 128K vocabulary), tokens
    a sub-block (the unit a pass skips); small in the interpreter."""
    return (256, 64) if is_interpreter() else (4096, 256)


def max_whole_rows(vocab: int, device: torch.device) -> int:
    """The most rows of ``vocab`` logits whose passes load every chunk whole: the kernels
    of those have variants of their own (a warm-up builds both sides)."""
    return _WHOLE_PROGRAMS_PER_SM * num_sms(device) // triton.cdiv(vocab, _chunk_sizes()[0])


@triton.jit
def _order_key(x):
    """fp32 -> int32 with the same order (negative floats get their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _order_key16(raw):
    """16-bit float (bfloat16/float16) -> int32 in [-32768, 32767] with the same order."""
    bits = raw.to(tl.int16, bitcast=True).to(tl.int32)
    return tl.where(bits < 0, bits ^ 0x7FFF, bits)


@triton.jit
def _value_key(v, KEY16: tl.constexpr, dtype: tl.constexpr):
    """The search's key of float32 values ``v`` (maxima as ``_prepare_kernel`` stored them:
    16-bit logits' own values under ``KEY16``, exact in ``dtype``)."""
    if KEY16:
        return _order_key16(v.to(dtype))
    else:
        return _order_key(v)


@triton.jit
def _key16_at_least(m, temp, dtype: tl.constexpr):
    """The smallest 16-bit key, from -inf's to +inf's, whose logit ``l`` has
    ``l / temp >= m`` as the kernels compute it (non-decreasing in the key, so a bisection
    of 16 steps over the key range finds it)."""
    lo = _order_key16(tl.full([], float("-inf"), dtype))
    hi = _order_key16(tl.full([], float("inf"), dtype))
    for _ in tl.static_range(16):
        mid = lo + (hi - lo) // 2  # lo <= mid < hi (integer // truncates)
        ok = _key16_logit(mid, dtype) / temp >= m
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid + 1)
    return hi


@triton.jit
def _key16_logit(key, dtype: tl.constexpr):
    """The 16-bit logit whose ``_order_key16`` is ``key``, as float32."""
    bits = tl.where(key < 0, key ^ 0x7FFF, key).to(tl.int16)
    return bits.to(dtype, bitcast=True).to(tl.float32)


@triton.jit
def _top_p_start(a, b, row_max, top_p, vocab, temp, KEY16: tl.constexpr, dtype: tl.constexpr):
    """A lower bound of the top-p threshold in ``[a, b]`` (``a`` the top-k threshold): the
    key of ``L = max + log((1 - p) / V) - 2``. Relative to the max's weight of 1, which the
    total ``M`` includes, the tokens below ``L`` weigh under ``(1 - p) e^-2 <= (1 - p) M``
    together, so the tokens at or above it hold more than ``p M``: the threshold is at or
    above ``L``. Taken for ``p < 0.999`` only, where that margin dwarfs float32 sums'
    rounding; else ``a``. Under ``KEY16`` the bisection for ``L``'s key runs only where
    ``a``'s own logit lies below ``L`` (a top-k threshold seldom does)."""
    start = a
    if top_p < 0.999:
        lower = row_max + tl.log(tl.maximum(1.0 - top_p, 1e-6) / vocab) - 2.0
        if KEY16:
            if _key16_logit(a, dtype) / temp < lower:
                key_lower = _key16_at_least(lower, temp, dtype).to(tl.int64)
                start = tl.minimum(tl.maximum(a, key_lower), b)
        else:
            start = tl.minimum(tl.maximum(a, _order_key(lower).to(tl.int64)), b)
    return start


@triton.jit
def _pivot_layout(a, b, start, NUM_PIVOTS: tl.constexpr):
    """``(base, step)`` of a pass's pivots over ``[a, b]``: pivot 0 at ``a``, pivot ``j >=
    1`` at ``min(base + j * step, b)``. Evenly over ``[a, b]`` when ``start == a``; else
    (the first top-p pass, ``start`` its lower bound) the other pivots evenly over
    ``[start, b]``, pivot 0 still summing the whole mass that top-p takes a fraction of."""
    even = (b - a + NUM_PIVOTS) // NUM_PIVOTS
    from_start = (b - start + NUM_PIVOTS - 1) // (NUM_PIVOTS - 1)
    step = tl.where(start == a, even, from_start)
    base = tl.where(start == a, a, start - from_start)
    return base, step


@triton.jit
def _loads_whole(sub_keys, key_lo, WHOLE: tl.constexpr, CHOOSE: tl.constexpr,
                 CHUNK: tl.constexpr, SUB: tl.constexpr):
    """Whether a program loads its chunk whole: in a grid of few programs an SM
    (``WHOLE``), or, where it ``CHOOSE``s, when more than two-thirds of its sub-blocks
    hold a key at or above ``key_lo`` (``sub_keys``: their maxima's keys); else it reads
    the live ones in turn. A kernel that never chooses compiles the one read path: the
    whole-chunk tile takes registers that the loop, one load after another, needs for its
    warps."""
    num_live = tl.sum((sub_keys >= key_lo).to(tl.int32), axis=0)
    return WHOLE or (CHOOSE and num_live * 3 > 2 * (CHUNK // SUB))


@triton.jit
def _load_keyed(src_ptr, stride_src, row, v, mask, temp, FROM_LOGITS: tl.constexpr,
                KEY16: tl.constexpr):
    """Processed logits of the tokens ``v`` as ``_prepare_kernel`` computes them, and
    their search keys: from the workspace it wrote, or (no bias, no penalties) the logits
    divided by the temperature again, the same operations on the same values; under
    ``KEY16`` the keys are the 16-bit logits' own."""
    raw = tl.load(src_ptr + row * stride_src + v, mask=mask, other=float("-inf"))
    x = raw.to(tl.float32)
    if FROM_LOGITS:
        x = x / temp
    if KEY16:
        key = _order_key16(raw)
    else:
        key = _order_key(x)
    return x, key


@triton.jit
def _prepare_kernel(
        logits_ptr, ws_ptr, chunk_max_ptr, chunk_arg_ptr, sub_max_ptr, temp_ptr, bias_ptr,
        prompt_mask_ptr, counts_ptr, presence_ptr, frequency_ptr, repetition_ptr,
        stride_logits, stride_bias, stride_prompt, stride_counts, vocab, num_chunks,
        greedy_temp, HAS_BIAS: tl.constexpr, HAS_PENALTIES: tl.constexpr,
        FROM_LOGITS: tl.constexpr, KEY16: tl.constexpr, CHUNK: tl.constexpr,
        SUB: tl.constexpr):
    """Processed logits into the workspace (unless later passes re-read the logits); the
    max (and its first index) of each chunk and the max of each SUB-token sub-block, which
    later passes use to skip chunks and sub-blocks (under ``KEY16`` the maxima of the
    logits themselves: the passes key them as 16-bit values)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    temp = tl.load(temp_ptr + row).to(tl.float32)
    temp = tl.where(temp < greedy_temp, 1.0, temp)
    v = chunk * CHUNK + tl.arange(0, CHUNK)
    vmask = v < vocab
    x = tl.load(logits_ptr + row * stride_logits + v, mask=vmask,
                other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + row * stride_bias + v, mask=vmask, other=0.0).to(tl.float32)
    if HAS_PENALTIES:
        presence = tl.load(presence_ptr + row).to(tl.float32)
        frequency = tl.load(frequency_ptr + row).to(tl.float32)
        repetition = tl.load(repetition_ptr + row).to(tl.float32)
        in_prompt = tl.load(prompt_mask_ptr + row * stride_prompt + v, mask=vmask,
                            other=0) != 0
        count = tl.load(counts_ptr + row * stride_counts + v, mask=vmask,
                        other=0).to(tl.float32)
        seen = in_prompt | (count > 0)
        x = tl.where(seen, tl.where(x > 0, x / repetition, x * repetition), x)
        x = x - frequency * count - presence * (count > 0).to(tl.float32)
    raw = x
    x = x / temp
    if not FROM_LOGITS:
        tl.store(ws_ptr + row * vocab + v, x, mask=vmask)
    if KEY16:
        top = raw
    else:
        top = x
    tl.store(chunk_max_ptr + row * num_chunks + chunk, tl.max(top, axis=0))
    tl.store(chunk_arg_ptr + row * num_chunks + chunk,
             chunk * CHUNK + tl.argmax(x, axis=0, tie_break_left=True))
    subs = tl.arange(0, CHUNK // SUB)
    sub_max = tl.max(tl.reshape(top, [CHUNK // SUB, SUB]), axis=1)
    tl.store(sub_max_ptr + row * num_chunks * (CHUNK // SUB) + chunk * (CHUNK // SUB) + subs,
             sub_max)


@triton.jit
def _radix_pass_kernel(
        src_ptr, stride_src, chunk_max_ptr, sub_max_ptr, temp_ptr, top_k_ptr, top_p_ptr,
        min_p_ptr, state_in_ptr, state_out_ptr, sums_in_ptr, sums_out_ptr, mass_k_ptr,
        vocab, num_chunks, greedy_temp, TOP_P_PHASE: tl.constexpr, STAGE: tl.constexpr,
        FROM_LOGITS: tl.constexpr, KEY16: tl.constexpr, WHOLE: tl.constexpr,
        NUM_PIVOTS: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
        BLOCK_C: tl.constexpr):
    """One radix pass over one vocab chunk of one row.

    ``state`` holds each row's key interval ``[a, b]`` (32-bit keys of ``x``, or under
    ``KEY16`` 16-bit keys of the logits); ``sums`` the count (top-k) or probability mass
    (top-p) of keys at or above the interval's 16 pivots. Every program first narrows the
    interval from the previous pass's complete sums (all programs get the same answer;
    chunk 0 stores it), then adds its chunk's sums for the new pivots, skipping the
    chunk, or its sub-blocks, whose max is below the interval.

    ``STAGE`` is as much of the pass's place in its search as the code tells apart (see
    ``_pass_stage``), so a search's later passes share one compiled variant.
    """
    dtype: tl.constexpr = src_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    # Every load a decision below reads, issued before the first decision: one memory
    # latency for all of them, not one per decision.
    temp = tl.load(temp_ptr + row)
    c = tl.arange(0, BLOCK_C)
    chunk_maxima = tl.load(chunk_max_ptr + row * num_chunks + c, mask=c < num_chunks,
                           other=float("-inf"))
    top_k = tl.load(top_k_ptr + row).to(tl.int64)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    chunk_key = _value_key(tl.load(chunk_max_ptr + row * num_chunks + chunk), KEY16, dtype)
    sub_row = sub_max_ptr + (row * num_chunks + chunk) * (CHUNK // SUB)
    sub_keys = _value_key(tl.load(sub_row + tl.arange(0, CHUNK // SUB)), KEY16, dtype)
    j_idx = tl.arange(0, NUM_PIVOTS)
    if STAGE == 0 and not TOP_P_PHASE:
        min_p = tl.load(min_p_ptr + row).to(tl.float32)
    else:
        a = tl.load(state_in_ptr + row * 2)
        b = tl.load(state_in_ptr + row * 2 + 1)
        sums = tl.load(sums_in_ptr + row * NUM_PIVOTS + j_idx)
        if TOP_P_PHASE and STAGE == 2:
            mass_k = tl.load(mass_k_ptr + row)
    if temp < greedy_temp:
        return
    row_max = tl.max(chunk_maxima, axis=0)
    key_max = _value_key(row_max, KEY16, dtype).to(tl.int64)
    if KEY16:
        row_max = row_max / temp  # the logits' max: x's is the same division of it
    top_k_on = (top_k > 0) & (top_k < vocab)
    if STAGE == 0 and not TOP_P_PHASE:
        # min-p keeps p >= min_p * p_max, i.e. x >= max + log(min_p).
        min_p_val = tl.where(min_p > 0, row_max + tl.log(tl.maximum(min_p, 1e-30)),
                             float("-inf"))
        if KEY16:
            # -inf's key, without the bisection, when min-p is off.
            a = _order_key16(tl.full([], float("-inf"), dtype)).to(tl.int64)
            if min_p > 0:
                a = _key16_at_least(min_p_val, temp, dtype).to(tl.int64)
        else:
            a = _order_key(min_p_val).to(tl.int64)
        # Without top-k the search is over before it starts: its threshold is min-p's.
        b = tl.where(top_k_on, key_max, a)
    else:
        if TOP_P_PHASE and STAGE > 0:
            # The first top-p pass's pivot 0 was the top-k threshold: its mass is the
            # total that top_p is a fraction of.
            if STAGE == 1:
                mass_k = tl.sum(tl.where(j_idx == 0, sums, 0.0), axis=0)
                if chunk == 0:
                    tl.store(mass_k_ptr + row, mass_k)
            target = tl.where(top_p < 1.0, top_p * mass_k, float("inf"))
        else:
            # Top-k passes, and the first top-p pass closing the top-k search.
            target = tl.where(top_k_on, top_k.to(tl.float32), float("inf"))
        # F is non-increasing in the pivot, so the passing pivots are a prefix.
        num_ok = tl.sum((sums >= target).to(tl.int64), axis=0)
        if TOP_P_PHASE and STAGE == 1:
            start = _top_p_start(a, b, row_max, top_p, vocab, temp, KEY16, dtype)
        else:
            start = a
        base, step = _pivot_layout(a, b, start, NUM_PIVOTS)
        j = tl.maximum(num_ok - 1, 0)
        new_a = tl.where(j == 0, a, tl.minimum(base + j * step, b))
        b = tl.where(num_ok == 0, new_a, tl.minimum(base + (j + 1) * step - 1, b))
        a = new_a
        if TOP_P_PHASE and STAGE == 0:
            # Top-p searches [top-k threshold, max]; nothing to search when it is off.
            b = tl.where(top_p < 1.0, key_max, a)
    if chunk == 0:
        tl.store(state_out_ptr + row * 2, a)
        tl.store(state_out_ptr + row * 2 + 1, b)
    if a == b:
        # Converged: the threshold is known, later passes need no sums.
        return
    a32 = a.to(tl.int32)
    if chunk_key < a32:
        # Nothing in the chunk reaches the lowest pivot: it adds nothing.
        return
    if TOP_P_PHASE and STAGE == 0:
        # The first top-p pass puts its pivots from a lower bound of the threshold up
        # (all but pivot 0): the search then needs fewer passes when the max stands
        # out (a later pass whose interval has converged returns at once).
        start = _top_p_start(a, b, row_max, top_p, vocab, temp, KEY16, dtype)
    else:
        start = a
    base, step = _pivot_layout(a, b, start, NUM_PIVOTS)
    # Top-k passes read by the loop: a top-k row's interval is narrow after its first
    # pass, and a row without top-k never gets here (its search is over at once).
    if _loads_whole(sub_keys, a32, WHOLE, TOP_P_PHASE, CHUNK, SUB):
        # Mostly live: the whole chunk in one load, so no load waits on another (a dead
        # sub-block is masked off, not read), then one reduction a pivot (a [CHUNK,
        # NUM_PIVOTS] tile would not fit in registers).
        t = tl.arange(0, CHUNK)
        live = tl.reshape(tl.broadcast_to((sub_keys >= a32)[:, None], [CHUNK // SUB, SUB]),
                          [CHUNK])
        end = tl.where(live, vocab, 0)
        v = chunk * CHUNK + t
        x, key = _load_keyed(src_ptr, stride_src, row, v, v < end, temp, FROM_LOGITS, KEY16)
        if TOP_P_PHASE:
            w = tl.exp2((x - row_max) * 1.4426950408889634)
        else:
            w = tl.full([CHUNK], 1.0, tl.float32)
        sums = tl.zeros([NUM_PIVOTS], tl.float32)
        for p in tl.static_range(NUM_PIVOTS):
            if p == 0:
                pivot = a32
            else:
                pivot = tl.minimum(base + p * step, b).to(tl.int32)
            sums = tl.where(j_idx == p, tl.sum(tl.where(key >= pivot, w, 0.0), axis=0),
                            sums)
    else:
        # Mostly dead (a narrow interval): only the live sub-blocks, one after another,
        # into a [SUB, NUM_PIVOTS] tile reduced once.
        pivots = tl.where(j_idx == 0, a,
                          tl.minimum(base + j_idx.to(tl.int64) * step, b)).to(tl.int32)
        acc = tl.zeros([SUB, NUM_PIVOTS], tl.float32)
        for s in range(CHUNK // SUB):
            if _value_key(tl.load(sub_row + s), KEY16, dtype) >= a32:
                v = chunk * CHUNK + s * SUB + tl.arange(0, SUB)
                x, key = _load_keyed(src_ptr, stride_src, row, v, v < vocab, temp,
                                     FROM_LOGITS, KEY16)
                ge = key[:, None] >= pivots[None, :]
                if TOP_P_PHASE:
                    w = tl.exp2((x - row_max) * 1.4426950408889634)
                    acc += tl.where(ge, w[:, None], 0.0)
                else:
                    acc += ge.to(tl.float32)
        sums = tl.sum(acc, axis=0)
    tl.atomic_add(sums_out_ptr + row * NUM_PIVOTS + j_idx, sums)


@triton.jit
def _token_uniforms(seed, rng_hi, first, NUM: tl.constexpr):
    """A ``[NUM, 4]`` tile of uniforms for the tokens ``first + 4 * i + c``: Philox counter
    ``rng_hi + token // 4``, word ``token % 4`` (four tokens a Philox call)."""
    u0, u1, u2, u3 = tl.rand4x(seed, rng_hi + (first // 4 + tl.arange(0, NUM)).to(tl.int64))
    c = tl.arange(0, 4)[None, :]
    return tl.where(c < 2, tl.where(c == 0, u0[:, None], u1[:, None]),
                    tl.where(c == 2, u2[:, None], u3[:, None]))


@triton.jit
def _gumbel_max(src_ptr, stride_src, row, v, end, temp, key_thr, seed, rng_hi, first,
                NUM: tl.constexpr, FROM_LOGITS: tl.constexpr, KEY16: tl.constexpr):
    """The best score and its token (the first among ties) of the ``[NUM, 4]`` tile of
    tokens ``v = first + 4 * i + c`` below ``end``: processed logit plus Gumbel noise,
    over the survivors (key at or above ``key_thr``)."""
    x, key = _load_keyed(src_ptr, stride_src, row, v, v < end, temp, FROM_LOGITS, KEY16)
    u = _token_uniforms(seed, rng_hi, first, NUM)
    gumbel = -tl.log(-tl.log(tl.maximum(u, 1e-20)))
    keep = (key >= key_thr) & (x > float("-inf"))
    score = tl.where(keep, x + gumbel, float("-inf"))
    best = tl.max(tl.max(score, axis=1), axis=0)
    tok = tl.min(tl.min(tl.where(score == best, v, 2147483647), axis=1), axis=0)
    return best, tok


@triton.jit
def _draw_kernel(src_ptr, stride_src, chunk_max_ptr, sub_max_ptr, temp_ptr, top_p_ptr,
                 state_ptr, sums_ptr, mass_k_ptr, seed_ptr, offset_ptr, chunk_score_ptr,
                 chunk_tok_ptr, vocab, num_chunks, greedy_temp, FROM_LOGITS: tl.constexpr,
                 KEY16: tl.constexpr, WHOLE: tl.constexpr, NUM_PIVOTS: tl.constexpr,
                 CHUNK: tl.constexpr, SUB: tl.constexpr):
    """Closes the top-p search, then a Gumbel-max draw over one chunk's survivors."""
    dtype: tl.constexpr = src_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    out = row * num_chunks + chunk
    # Every load a decision below reads, issued before the first decision.
    temp = tl.load(temp_ptr + row)
    a = tl.load(state_ptr + row * 2)
    b = tl.load(state_ptr + row * 2 + 1)
    j_idx = tl.arange(0, NUM_PIVOTS)
    masses = tl.load(sums_ptr + row * NUM_PIVOTS + j_idx)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    mass_k = tl.load(mass_k_ptr + row)
    chunk_key = _value_key(tl.load(chunk_max_ptr + out), KEY16, dtype)
    sub_row = sub_max_ptr + out * (CHUNK // SUB)
    sub_keys = _value_key(tl.load(sub_row + tl.arange(0, CHUNK // SUB)), KEY16, dtype)
    seed = tl.load(seed_ptr + row).to(tl.int64)
    rng_hi = tl.load(offset_ptr + row).to(tl.int64) << 32
    if temp < greedy_temp:
        return
    # The last top-p pass spread its pivots evenly (a lower bound shapes only the first,
    # and a single top-p pass means top-p is off).
    base, step = _pivot_layout(a, b, a, NUM_PIVOTS)
    target = tl.where(top_p < 1.0, top_p * mass_k, float("inf"))
    num_ok = tl.sum((masses >= target).to(tl.int64), axis=0)
    key_thr = tl.where(a == b, a, tl.minimum(base + tl.maximum(num_ok - 1, 0) * step, b))
    key_thr = key_thr.to(tl.int32)
    if chunk_key < key_thr:
        # No survivor in the chunk.
        tl.store(chunk_score_ptr + out, float("-inf"))
        tl.store(chunk_tok_ptr + out, chunk * CHUNK)
        return

    first = chunk * CHUNK
    if _loads_whole(sub_keys, key_thr, WHOLE, True, CHUNK, SUB):
        # Mostly live: the chunk as one [CHUNK // 4, 4] tile (token first + 4 * i + c),
        # the uniforms' layout, in one load; a dead sub-block is masked off (not read).
        i = tl.arange(0, CHUNK // 4)
        v = first + 4 * i[:, None] + tl.arange(0, 4)[None, :]
        live = tl.reshape(tl.broadcast_to((sub_keys >= key_thr)[:, None],
                                          [CHUNK // SUB, SUB // 4]), [CHUNK // 4])
        end = tl.where(live, vocab, 0)
        best_score, best_tok = _gumbel_max(src_ptr, stride_src, row, v, end[:, None], temp,
                                           key_thr, seed, rng_hi, first, CHUNK // 4,
                                           FROM_LOGITS, KEY16)
    else:
        # Mostly dead: only the live sub-blocks, one after another.
        in_tile = 4 * tl.arange(0, SUB // 4)[:, None] + tl.arange(0, 4)[None, :]
        best_score = tl.full([], float("-inf"), tl.float32)
        best_tok = first
        for s in range(CHUNK // SUB):
            v0 = first + s * SUB
            if _value_key(tl.load(sub_row + s), KEY16, dtype) >= key_thr:
                sub_best, sub_tok = _gumbel_max(src_ptr, stride_src, row, v0 + in_tile,
                                                vocab, temp, key_thr, seed, rng_hi, v0,
                                                SUB // 4, FROM_LOGITS, KEY16)
                take = sub_best > best_score
                best_tok = tl.where(take, sub_tok, best_tok)
                best_score = tl.where(take, sub_best, best_score)
    tl.store(chunk_score_ptr + out, best_score)
    tl.store(chunk_tok_ptr + out, best_tok)


@triton.jit
def _finalize_kernel(temp_ptr, chunk_max_ptr, chunk_arg_ptr, chunk_score_ptr,
                     chunk_tok_ptr, out_ptr, num_chunks, greedy_temp,
                     BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    cmask = c < num_chunks
    if tl.load(temp_ptr + row) < greedy_temp:
        vals = tl.load(chunk_max_ptr + row * num_chunks + c, mask=cmask, other=float("-inf"))
        toks = tl.load(chunk_arg_ptr + row * num_chunks + c, mask=cmask, other=0)
    else:
        vals = tl.load(chunk_score_ptr + row * num_chunks + c, mask=cmask,
                       other=float("-inf"))
        toks = tl.load(chunk_tok_ptr + row * num_chunks + c, mask=cmask, other=0)
    best = tl.argmax(vals, axis=0, tie_break_left=True)
    tl.store(out_ptr + row, tl.sum(tl.where(c == best, toks, 0), axis=0).to(tl.int64))


def _pass_stage(top_p_phase: bool, pass_index: int) -> int:
    """The radix pass kernel's ``STAGE``: 0 for a search's first pass, 1 for its second,
    2 for a later top-p pass (it reads the mass the second stored); a top-k search's later
    passes run its second's code. A search of 8 passes compiles 3 variants, not 8."""
    return min(pass_index, 2 if top_p_phase else 1)


def _row_param(name: str, t: torch.Tensor, num_rows: int, device: torch.device,
               dtypes) -> None:
    check_tensor(name, t, ndim=1, dtypes=dtypes, device=device, contiguous=True)
    if t.shape[0] != num_rows:
        raise ValueError(f"{name} must have {num_rows} entries, got {t.shape[0]}.")


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
           offsets: torch.Tensor, *, logit_bias: torch.Tensor | None = None,
           prompt_mask: torch.Tensor | None = None,
           output_counts: torch.Tensor | None = None,
           presence_penalty: torch.Tensor | None = None,
           frequency_penalty: torch.Tensor | None = None,
           repetition_penalty: torch.Tensor | None = None,
           workspace: torch.Tensor | None = None, no_top_k: bool = False,
           no_top_p: bool = False) -> torch.Tensor:
    """Sample one token per row with per-row parameters (launches set by host arguments).

    Per row, in vLLM's order: ``x = logits + logit_bias``; penalties as
    ``torch_ref.apply_penalties``; greedy rows (``temperature < 1e-5``) return
    ``argmax(x)`` (first index on ties); other rows divide by the temperature, filter as
    ``torch_ref.filter_logits`` (min-p, then top-k, then top-p) and draw from the
    softmax of what survives.

    Args:
        logits: ``[B, V]`` fp32/bf16/fp16, last dim contiguous.
        temperature, top_p, min_p: ``[B]`` fp32 (``top_p == 1``/``min_p == 0`` = off).
        top_k: ``[B]`` int32/int64 (``<= 0`` or ``>= V`` = off).
        seeds: ``[B]`` int32/int64 Philox keys; offsets: ``[B]`` int32/int64 counters.
            The same ``(seed, offset)`` and logits give the same token in any batch;
            advance the offset by one per generated token.
        logit_bias: optional ``[B, V]`` fp32 added first (``-inf`` forbids a token).
        prompt_mask: optional ``[B, V]`` bool, tokens of the prompt.
        output_counts: optional ``[B, V]`` int32/int64, counts of generated tokens.
        presence_penalty, frequency_penalty, repetition_penalty: ``[B]`` fp32; all five
            penalty arguments go together.
        workspace: optional ``[B, V]`` fp32 scratch (e.g. preallocated for CUDA graphs);
            it holds the processed, temperature-scaled logits afterwards. Without one,
            rows without a bias or penalties re-read ``logits`` in every pass instead.
        no_top_k, no_top_p: the caller knows that no row draws with top-k (with top-p):
            that search launches its first pass only (which applies min-p, or closes the
            top-k search), not its others. A row that does filter so gets a wrong
            threshold.
    Returns:
        ``[B]`` int64 sampled token ids.
    """
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    num_rows, vocab = logits.shape
    dev = logits.device
    for name, t in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        _row_param(name, t, num_rows, dev, (torch.float32,))
    _row_param("top_k", top_k, num_rows, dev, INDEX_DTYPES)
    _row_param("seeds", seeds, num_rows, dev, INDEX_DTYPES)
    _row_param("offsets", offsets, num_rows, dev, INDEX_DTYPES)
    if logit_bias is not None:
        check_tensor("logit_bias", logit_bias, ndim=2, dtypes=(torch.float32,), device=dev,
                     last_dim_contiguous=True)
        if tuple(logit_bias.shape) != (num_rows, vocab):
            raise ValueError(f"logit_bias must have shape {(num_rows, vocab)}, "
                             f"got {tuple(logit_bias.shape)}.")
    penalties = (prompt_mask, output_counts, presence_penalty, frequency_penalty,
                 repetition_penalty)
    has_penalties = any(t is not None for t in penalties)
    if has_penalties:
        if any(t is None for t in penalties):
            raise ValueError("prompt_mask, output_counts and the three penalties must be "
                             "given together.")
        check_tensor("prompt_mask", prompt_mask, ndim=2, dtypes=(torch.bool,), device=dev,
                     last_dim_contiguous=True)
        check_tensor("output_counts", output_counts, ndim=2, dtypes=INDEX_DTYPES,
                     device=dev, last_dim_contiguous=True)
        for name, table in (("prompt_mask", prompt_mask), ("output_counts", output_counts)):
            if tuple(table.shape) != (num_rows, vocab):  # type: ignore[union-attr]
                raise ValueError(f"{name} must have shape {(num_rows, vocab)}, "
                                 f"got {tuple(table.shape)}.")  # type: ignore[union-attr]
        for name, penalty in (("presence_penalty", presence_penalty),
                              ("frequency_penalty", frequency_penalty),
                              ("repetition_penalty", repetition_penalty)):
            _row_param(name, penalty, num_rows, dev, (torch.float32,))  # type: ignore[arg-type]
    # Without a bias or penalties every pass can recompute the processed logits from
    # the logits themselves: no float32 copy written, and 16-bit logits read at half the
    # bytes of one.
    from_logits = workspace is None and logit_bias is None and not has_penalties
    # ... and 16-bit logits are searched over their own 16-bit keys: half the passes.
    key16 = from_logits and logits.dtype in (torch.bfloat16, torch.float16)
    num_passes = _NUM_PASSES // 2 if key16 else _NUM_PASSES
    if from_logits:
        workspace = logits  # never written (FROM_LOGITS)
    elif workspace is None:
        workspace = torch.empty(num_rows, vocab, dtype=torch.float32, device=dev)
    else:
        check_tensor("workspace", workspace, ndim=2, dtypes=(torch.float32,), device=dev,
                     contiguous=True)
        if workspace.shape[0] < num_rows or workspace.shape[1] != vocab:
            raise ValueError(f"workspace must be [>= {num_rows}, {vocab}], "
                             f"got {tuple(workspace.shape)}.")
    out = torch.empty(num_rows, dtype=torch.int64, device=dev)
    if num_rows == 0:
        return out

    chunk, sub = _chunk_sizes()
    num_chunks = triton.cdiv(vocab, chunk)
    block_c = triton.next_power_of_2(num_chunks)
    grid = (num_rows, num_chunks)
    # A grid of few programs an SM waits on memory latency: every chunk loads whole.
    whole = num_rows <= max_whole_rows(vocab, dev)
    chunk_max = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=dev)
    chunk_arg = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=dev)
    sub_max = torch.empty(num_rows, num_chunks * (chunk // sub), dtype=torch.float32,
                          device=dev)
    chunk_score = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=dev)
    chunk_tok = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=dev)
    # (top-p phase, pass) of each launch: a search no row needs stops after its first
    # pass, whose rows then hold their converged interval (the other passes would only
    # hand it on).
    passes = [(False, i) for i in range(1 if no_top_k else num_passes)]
    passes += [(True, i) for i in range(1 if no_top_p else num_passes)]
    state = torch.empty(len(passes), num_rows, 2, dtype=torch.int64, device=dev)
    sums = torch.zeros(len(passes), num_rows, _NUM_PIVOTS, dtype=torch.float32, device=dev)
    mass_k = torch.empty(num_rows, dtype=torch.float32, device=dev)

    dummy = logits
    _prepare_kernel[grid](
        logits, workspace, chunk_max, chunk_arg, sub_max, temperature,
        logit_bias if logit_bias is not None else dummy,
        prompt_mask if has_penalties else dummy,
        output_counts if has_penalties else dummy,
        presence_penalty if has_penalties else temperature,
        frequency_penalty if has_penalties else temperature,
        repetition_penalty if has_penalties else temperature,
        logits.stride(0), logit_bias.stride(0) if logit_bias is not None else 0,
        prompt_mask.stride(0) if prompt_mask is not None else 0,
        output_counts.stride(0) if output_counts is not None else 0,
        vocab, num_chunks, GREEDY_TEMPERATURE, HAS_BIAS=logit_bias is not None,
        HAS_PENALTIES=has_penalties, FROM_LOGITS=from_logits, KEY16=key16, CHUNK=chunk,
        SUB=sub, num_warps=8)
    src, stride_src = (logits, logits.stride(0)) if from_logits else (workspace, vocab)
    for i, (top_p_phase, pass_index) in enumerate(passes):
        prev = max(i - 1, 0)
        _radix_pass_kernel[grid](
            src, stride_src, chunk_max, sub_max, temperature, top_k, top_p, min_p,
            state[prev], state[i], sums[prev], sums[i], mass_k, vocab, num_chunks,
            GREEDY_TEMPERATURE, TOP_P_PHASE=top_p_phase,
            STAGE=_pass_stage(top_p_phase, pass_index),
            FROM_LOGITS=from_logits, KEY16=key16, WHOLE=whole, NUM_PIVOTS=_NUM_PIVOTS, CHUNK=chunk,
            SUB=sub, BLOCK_C=block_c, num_warps=4)
    _draw_kernel[grid](
        src, stride_src, chunk_max, sub_max, temperature, top_p, state[-1], sums[-1],
        mass_k, seeds, offsets, chunk_score, chunk_tok, vocab, num_chunks,
        GREEDY_TEMPERATURE, FROM_LOGITS=from_logits, KEY16=key16, WHOLE=whole,
        NUM_PIVOTS=_NUM_PIVOTS, CHUNK=chunk, SUB=sub, num_warps=4)
    _finalize_kernel[(num_rows,)](
        temperature, chunk_max, chunk_arg, chunk_score, chunk_tok, out, num_chunks,
        GREEDY_TEMPERATURE, BLOCK_C=block_c, num_warps=1)
    return out
