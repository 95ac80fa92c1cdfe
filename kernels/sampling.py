"""Fused sampling: logit bias, penalties, temperature, min-p/top-k/top-p, greedy, seeded draws.

One program owns one row and streams it a few times; no pass sorts the vocabulary.
Top-k and top-p become value thresholds found by a 16-way radix search over the
order-preserving int32 image of the fp32 logits: each pass counts (top-k) or sums the
probability mass (top-p) of the logits at or above 16 pivots and narrows the range 16x,
so about 8 passes find the exact threshold. Ties at the top-k threshold are all kept, as
in ``torch_ref.filter_logits``. The draw is a Gumbel-max over the surviving logits with
Philox noise keyed by a per-row seed and offset, so it is reproducible per request.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, is_interpreter

# Below this temperature a row is greedy (SamplingParams' threshold).
GREEDY_TEMPERATURE = 1e-5
_LOG2E = 1.4426950408889634
# Pivots per radix pass: 16 (4 bits a pass) keeps the compare matrix in registers.
_NUM_PIVOTS = 16


@triton.jit
def _order_key(x):
    """fp32 -> int32 with the same order (negative floats get their magnitude bits flipped).
    Loops inline this expression: nested jit calls are slow in the interpreter."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _mass_at_or_above(ws_row, vocab, key_lo, row_max, BLOCK_V: tl.constexpr):
    total = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(ws_row + v, mask=v < vocab, other=float("-inf"))
        bits = x.to(tl.int32, bitcast=True)
        keep = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits) >= key_lo
        total += tl.where(keep, tl.exp2((x - row_max) * 1.4426950408889634), 0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _radix_select(ws_row, vocab, key_lo, key_hi, target, row_max, USE_MASS: tl.constexpr,
                  BLOCK_V: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """Largest key t in [key_lo, key_hi] whose count (or mass) of keys >= t reaches
    ``target``; ``key_lo`` when even key_lo falls short."""
    a = key_lo.to(tl.int64)
    b = key_hi.to(tl.int64)
    j_idx = tl.arange(0, NUM_PIVOTS)
    while a < b:
        step = (b - a + NUM_PIVOTS) // NUM_PIVOTS
        pivots = tl.minimum(a + j_idx.to(tl.int64) * step, b).to(tl.int32)
        acc = tl.zeros([NUM_PIVOTS], tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(ws_row + v, mask=v < vocab, other=float("-inf"))
            bits = x.to(tl.int32, bitcast=True)
            key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
            ge = key[:, None] >= pivots[None, :]
            if USE_MASS:
                w = tl.exp2((x - row_max) * 1.4426950408889634)
                acc += tl.sum(tl.where(ge, w[:, None], 0.0), axis=0)
            else:
                acc += tl.sum(ge.to(tl.float32), axis=0)
        # F is non-increasing in the pivot, so the passing pivots are a prefix.
        num_ok = tl.sum((acc >= target).to(tl.int64), axis=0)
        j = tl.maximum(num_ok - 1, 0)
        new_a = tl.minimum(a + j * step, b)
        new_b = tl.minimum(a + (j + 1) * step - 1, b)
        a = new_a
        b = tl.where(num_ok == 0, a, new_b)
    return a.to(tl.int32)


@triton.jit
def _sampling_kernel(
        logits_ptr, ws_ptr, out_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr,
        offset_ptr, bias_ptr, prompt_mask_ptr, counts_ptr, presence_ptr, frequency_ptr,
        repetition_ptr, stride_logits, stride_bias, stride_prompt, stride_counts, vocab,
        greedy_temp, HAS_BIAS: tl.constexpr, HAS_PENALTIES: tl.constexpr,
        BLOCK_V: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    temp = tl.load(temp_ptr + row).to(tl.float32)
    is_greedy = temp < greedy_temp
    temp = tl.where(is_greedy, 1.0, temp)
    if HAS_PENALTIES:
        presence = tl.load(presence_ptr + row).to(tl.float32)
        frequency = tl.load(frequency_ptr + row).to(tl.float32)
        repetition = tl.load(repetition_ptr + row).to(tl.float32)
    ws_row = ws_ptr + row * vocab

    # Pass 1: processed logits into the workspace, with the row max and its first index.
    best_val = float("-inf")
    best_idx = 0
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        vmask = v < vocab
        x = tl.load(logits_ptr + row * stride_logits + v, mask=vmask,
                    other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + row * stride_bias + v, mask=vmask, other=0.0).to(tl.float32)
        if HAS_PENALTIES:
            in_prompt = tl.load(prompt_mask_ptr + row * stride_prompt + v, mask=vmask,
                                other=0) != 0
            count = tl.load(counts_ptr + row * stride_counts + v, mask=vmask,
                            other=0).to(tl.float32)
            seen = in_prompt | (count > 0)
            x = tl.where(seen, tl.where(x > 0, x / repetition, x * repetition), x)
            x = x - frequency * count - presence * (count > 0).to(tl.float32)
        x = x / temp
        tl.store(ws_row + v, x, mask=vmask)
        chunk_max = tl.max(x, axis=0)
        chunk_idx = tl.argmax(x, axis=0, tie_break_left=True)
        take = chunk_max > best_val
        best_idx = tl.where(take, v0 + chunk_idx, best_idx)
        best_val = tl.where(take, chunk_max, best_val)

    if is_greedy:
        tl.store(out_ptr + row, best_idx.to(tl.int64))
    else:
        row_max = best_val
        top_k = tl.load(top_k_ptr + row).to(tl.int64)
        top_p = tl.load(top_p_ptr + row).to(tl.float32)
        min_p = tl.load(min_p_ptr + row).to(tl.float32)
        key_max = _order_key(row_max)
        # min-p keeps p >= min_p * p_max, i.e. x >= max + log(min_p).
        min_p_val = tl.where(min_p > 0, row_max + tl.log(tl.maximum(min_p, 1e-30)),
                             float("-inf"))
        key_thr = _order_key(min_p_val)
        if (top_k > 0) & (top_k < vocab):
            key_thr = _radix_select(ws_row, vocab, key_thr, key_max, top_k.to(tl.float32),
                                    row_max, False, BLOCK_V, NUM_PIVOTS)
        if top_p < 1.0:
            mass = _mass_at_or_above(ws_row, vocab, key_thr, row_max, BLOCK_V)
            key_thr = _radix_select(ws_row, vocab, key_thr, key_max, top_p * mass, row_max,
                                    True, BLOCK_V, NUM_PIVOTS)
        # Gumbel-max over the survivors; Philox counter = (vocab index, row offset).
        seed = tl.load(seed_ptr + row).to(tl.int64)
        rng_hi = tl.load(offset_ptr + row).to(tl.int64) << 32
        best_score = float("-inf")
        best_tok = best_idx
        for v0 in range(0, vocab, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            vmask = v < vocab
            x = tl.load(ws_row + v, mask=vmask, other=float("-inf"))
            u = tl.rand(seed, rng_hi + v.to(tl.int64))
            gumbel = -tl.log(-tl.log(tl.maximum(u, 1e-20)))
            bits = x.to(tl.int32, bitcast=True)
            key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
            keep = (key >= key_thr) & (x > float("-inf")) & vmask
            score = tl.where(keep, x + gumbel, float("-inf"))
            chunk_best = tl.max(score, axis=0)
            chunk_idx = tl.argmax(score, axis=0, tie_break_left=True)
            take = chunk_best > best_score
            best_tok = tl.where(take, v0 + chunk_idx, best_tok)
            best_score = tl.where(take, chunk_best, best_score)
        tl.store(out_ptr + row, best_tok.to(tl.int64))


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
           workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one token per row with per-row parameters, in one launch.

    Per row, in vLLM's order: ``x = logits + logit_bias``; penalties as
    ``torch_ref.apply_penalties``; greedy rows (``temperature < 1e-5``) return
    ``argmax(x)`` (first index on ties); other rows divide by the temperature, filter as
    ``torch_ref.filter_logits`` (min-p, then top-k, then top-p) and draw from the
    softmax of what survives.

    Args:
        logits: ``[B, V]`` fp32/bf16/fp16, last dim contiguous.
        temperature, top_p, min_p: ``[B]`` fp32 (``top_p == 1``/``min_p == 0`` = off).
        top_k: ``[B]`` int32/int64 (``<= 0`` or ``>= V`` = off).
        seeds: ``[B]`` int64 Philox keys; offsets: ``[B]`` int64 counters. The same
            ``(seed, offset)`` and logits give the same token in any batch; advance the
            offset by one per generated token.
        logit_bias: optional ``[B, V]`` fp32 added first (``-inf`` forbids a token).
        prompt_mask: optional ``[B, V]`` bool, tokens of the prompt.
        output_counts: optional ``[B, V]`` int32/int64, counts of generated tokens.
        presence_penalty, frequency_penalty, repetition_penalty: ``[B]`` fp32; all five
            penalty arguments go together.
        workspace: optional ``[B, V]`` fp32 scratch (e.g. preallocated for CUDA graphs);
            it holds the processed, temperature-scaled logits afterwards.
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
        for name, t in (("prompt_mask", prompt_mask), ("output_counts", output_counts)):
            if tuple(t.shape) != (num_rows, vocab):
                raise ValueError(f"{name} must have shape {(num_rows, vocab)}, "
                                 f"got {tuple(t.shape)}.")
        for name, t in (("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty),
                        ("repetition_penalty", repetition_penalty)):
            _row_param(name, t, num_rows, dev, (torch.float32,))
    if workspace is None:
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
    block_v = 256 if is_interpreter() else 1024
    dummy = logits
    _sampling_kernel[(num_rows,)](
        logits, workspace, out, temperature, top_k, top_p, min_p, seeds, offsets,
        logit_bias if logit_bias is not None else dummy,
        prompt_mask if has_penalties else dummy,
        output_counts if has_penalties else dummy,
        presence_penalty if has_penalties else temperature,
        frequency_penalty if has_penalties else temperature,
        repetition_penalty if has_penalties else temperature,
        logits.stride(0), logit_bias.stride(0) if logit_bias is not None else 0,
        prompt_mask.stride(0) if has_penalties else 0,
        output_counts.stride(0) if has_penalties else 0,
        vocab, GREEDY_TEMPERATURE, HAS_BIAS=logit_bias is not None,
        HAS_PENALTIES=has_penalties, BLOCK_V=block_v, NUM_PIVOTS=_NUM_PIVOTS, num_warps=8)
    return out
