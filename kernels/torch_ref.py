"""Torch reference ops: the CPU backend and the oracle of every kernel test.

Layouts shared with the Triton kernels:
- KV cache of one layer: ``key_cache`` and ``value_cache``, each
  ``[num_blocks, block_size, num_kv_heads, head_dim]``.
- ``slot_mapping[t] = block_id * block_size + offset`` for each new token; -1 skips it.
- A batch is packed: request ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``,
  which are its last tokens; ``seq_lens[i]`` counts all its tokens (cached + new), whose
  KV is already written to the cache before attention runs.
- ``cos_sin_cache[position] = cat(cos, sin)`` over ``rot_dim // 2`` frequencies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.fp8 import is_fp8, quantize_fp8


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm as transformers' Llama computes it; with ``residual``, adds it first and
    returns ``(normed, x + residual)``."""
    if residual is not None:
        x = x + residual
        residual = x
    orig_dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(orig_dtype)
    return out if residual is None else (out, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x[..., 2d]``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox_style: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rot_dim`` dims of each head of ``query[T, H, D]``/``key[T, Hkv, D]``.

    Neox style rotates halves (transformers' ``rotate_half``); GPT-J style rotates
    interleaved pairs. Returns new tensors.
    """
    cos_sin = cos_sin_cache[positions.long()]
    cos, sin = cos_sin.chunk(2, dim=-1)
    rot_dim = cos_sin.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rot_dim].float(), x[..., rot_dim:]
        c, s = cos[:, None, :].float(), sin[:, None, :].float()
        if is_neox_style:
            x1, x2 = x_rot.chunk(2, dim=-1)
            out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        else:
            x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
            out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        return torch.cat((out.to(x.dtype), x_pass), dim=-1)

    return rotate(query), rotate(key)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store ``key[T, Hkv, D]``/``value`` at their slots (in place); slot -1 is skipped.
    An FP8 cache stores ``k / k_scale`` and ``v / v_scale``, saturated."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    key_cache.view(-1, *key_cache.shape[2:])[slots] = _to_cache(key[valid], key_cache, k_scale)
    value_cache.view(-1, *value_cache.shape[2:])[slots] = _to_cache(value[valid], value_cache,
                                                                    v_scale)


def _to_cache(x: torch.Tensor, cache: torch.Tensor, scale: float) -> torch.Tensor:
    if is_fp8(cache.dtype):
        return quantize_fp8(x, scale, cache.dtype)
    return x.to(cache.dtype)


def strided_visible(distance: torch.Tensor, stride: int) -> torch.Tensor:
    """The strided sparse pattern (Sparse Transformer): a query sees the ``stride`` latest
    keys and every ``stride``-th key before them (``distance`` = query pos - key pos)."""
    return (distance < stride) | (distance % stride == 0)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float,
                    sliding_window: int | None = None,
                    logit_softcap: float | None = None,
                    attention_stride: int | None = None,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of packed queries ``[T, H, D]`` over each request's paged KV.

    Query ``j`` of a request with ``n`` queries sits at position ``seq_len - n + j`` and
    sees keys at positions ``p <= pos`` (and ``pos - p < sliding_window`` if set; with
    ``attention_stride`` s, the strided pattern: ``pos - p < s`` or ``(pos - p) % s == 0``).
    With ``logit_softcap`` the scaled scores are capped at ``c * tanh(s / c)`` (Gemma 2).
    Covers decode (``n == 1``), prefill and chunked prefill after a prefix hit. The
    cache is read as ``k * k_scale``, ``v * v_scale`` (an FP8 cache's scales).
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q = query[starts[i]:starts[i + 1]].float()
        n = q.shape[0]
        if n == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[i, :num_blocks].long()
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float() * k_scale
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float() * v_scale
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if logit_softcap is not None:
            scores = logit_softcap * torch.tanh(scores / logit_softcap)
        q_pos = torch.arange(seq_len - n, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= (q_pos - k_pos) < sliding_window
        if attention_stride is not None:
            mask &= strided_visible(q_pos - k_pos, attention_stride)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[i]:starts[i + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out


def unpack_token_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[R, W]`` int32 words -> ``[R, vocab]`` bool, True where a token is allowed (bit
    ``t % 32`` of word ``t // 32``)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.to(torch.int32)[:, :, None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: torch.Tensor) -> None:
    """Set ``logits[rows[r], t]`` to -inf where bit t of ``bitmask[r]`` is 0 (in place)."""
    if rows.numel() == 0:
        return
    allowed = unpack_token_bitmask(bitmask, logits.shape[1])
    index = rows.long()
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor,
                    output_counts: torch.Tensor, presence_penalty: torch.Tensor,
                    frequency_penalty: torch.Tensor, repetition_penalty: torch.Tensor
                    ) -> torch.Tensor:
    """vLLM's penalties on ``logits[B, V]``.

    ``prompt_mask[B, V]`` marks tokens in the prompt, ``output_counts[B, V]`` counts
    generated ones. Repetition penalty divides positive and multiplies negative logits of
    tokens seen in either; frequency and presence subtract for generated tokens.
    """
    logits = logits.float()
    output_mask = output_counts > 0
    seen = prompt_mask | output_mask
    rep = repetition_penalty[:, None].float().expand_as(logits)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency_penalty[:, None].float() * output_counts.float()
    logits = logits - presence_penalty[:, None].float() * output_mask.float()
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Mask (with -inf) what min-p, then top-k, then top-p remove from ``logits[B, V]``.

    Per row: ``top_k <= 0`` or ``>= V`` is off, ``top_p == 1`` is off, ``min_p == 0`` is
    off. Ties at the top-k threshold are all kept. Top-p keeps the smallest prefix of the
    sorted distribution (renormalised after top-k) whose mass reaches ``top_p``.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None].float()
    logits = logits.masked_fill(probs < threshold, float("-inf"))

    sorted_logits, _ = logits.sort(dim=-1, descending=True)
    k = top_k.long().clone()
    k[(k <= 0) | (k > vocab)] = vocab
    kth = sorted_logits.gather(-1, (k - 1)[:, None])
    logits = logits.masked_fill(logits < kth, float("-inf"))

    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # Rows with top_p == 1 keep everything: rounding can push the cumsum to 1 before the tail.
    remove_sorted = (mass_before >= top_p[:, None].float()) & (top_p[:, None] < 1.0)
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


# Philox-4x32-10 constants, as Triton's ``tl.rand`` uses them.
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # 32 x 32 -> 64-bit product in int64 without overflow: split b into 16-bit halves.
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox_uniform(seeds: torch.Tensor, counter_hi: torch.Tensor,
                   counter_lo: torch.Tensor | int = 0) -> torch.Tensor:
    """``tl.rand(seed, (counter_hi << 32) + counter_lo)`` bit for bit, in torch.

    Args:
        seeds: int64 Philox keys (non-negative).
        counter_hi, counter_lo: the counter's high and low 32-bit words (broadcast with
            ``seeds``).
    Returns:
        float32 uniforms in [0, 1).
    """
    seeds = seeds.long()
    k0, k1 = seeds & _MASK32, (seeds >> 32) & _MASK32
    c1 = torch.as_tensor(counter_hi, device=seeds.device).long() & _MASK32
    c0 = torch.as_tensor(counter_lo, device=seeds.device).long() & _MASK32
    c0, c1, k0, k1 = torch.broadcast_tensors(c0, c1, k0, k1)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    # uint32 -> int32 bits; negative ones flipped, then scaled below 1 (tl.rand's mapping).
    signed = torch.where(c0 >= 1 << 31, c0 - (1 << 32), c0)
    folded = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
           offsets: torch.Tensor, *, prompt_mask: torch.Tensor | None = None,
           output_counts: torch.Tensor | None = None,
           presence_penalty: torch.Tensor | None = None,
           frequency_penalty: torch.Tensor | None = None,
           repetition_penalty: torch.Tensor | None = None,
           needs_filter: bool = True) -> torch.Tensor:
    """The CPU counterpart of ``kernels.sampling.sample`` (same arguments and row rules).

    Penalties, then greedy rows (``temperature < 1e-5``) take the first argmax; the others
    divide by the temperature, filter as ``filter_logits`` and draw by inverse CDF over the
    vocabulary in id order with ONE uniform ``philox_uniform(seed, offset)`` per row: the
    draw depends only on (seed, offset, logits), whatever else the batch holds. (The kernel
    keys the same Philox stream by (seed, offset) but draws one Gumbel per token, which is
    too slow on a CPU.)

    Args:
        needs_filter: False skips ``filter_logits`` when the caller knows no row filters.
    Returns:
        ``[B]`` int64 token ids.
    """
    x = logits.float()
    if prompt_mask is not None:
        assert output_counts is not None and presence_penalty is not None
        assert frequency_penalty is not None and repetition_penalty is not None
        x = apply_penalties(x, prompt_mask, output_counts, presence_penalty,
                            frequency_penalty, repetition_penalty)
    greedy = temperature < 1e-5
    argmax = x.argmax(dim=-1)
    if bool(greedy.all()):
        return argmax
    x = x / torch.where(greedy, 1.0, temperature.float())[:, None]
    if needs_filter:
        x = filter_logits(x, top_k, top_p, min_p)
    cdf = torch.softmax(x, dim=-1).double().cumsum_(dim=-1)
    u = philox_uniform(seeds, offsets).double()
    # The first token whose CDF passes u * total: a zero-probability token never is.
    target = (u * cdf[:, -1])[:, None]
    drawn = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=x.shape[-1] - 1)
    return torch.where(greedy, argmax, drawn)


def scatter_sampled(input_ids: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
                    sampled: torch.Tensor) -> None:
    """``input_ids[dst] = sampled[src]`` in place, cast to ``input_ids``' dtype."""
    input_ids[dst] = sampled[src].to(input_ids.dtype)


def decode_graph_inputs(inputs: dict[str, torch.Tensor], graph: dict[str, torch.Tensor],
                        size: int) -> None:
    """A decode batch into a CUDA graph's static buffers (``kernels.step_inputs``' layout):
    rows ``[0, B)`` take ``inputs``, padding rows ``[B, size)`` slot -1 and length 0."""
    num_reqs, width = inputs["block_tables"].shape
    for name in ("input_ids", "positions", "slot_mapping", "seq_lens"):
        graph[name][:num_reqs].copy_(inputs[name], non_blocking=True)
    graph["slot_mapping"][num_reqs:size].fill_(-1)
    graph["seq_lens"][num_reqs:size].zero_()
    graph["block_tables"][:num_reqs, :width].copy_(inputs["block_tables"], non_blocking=True)
