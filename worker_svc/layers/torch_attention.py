"""The torch attention backend: the reference KV write and SDPA over the paged cache (CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import torch_ref
from worker_svc.layers.attention import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    """The CPU path: torch_ref's KV write, and the same attention as
    ``torch_ref.paged_attention`` with decode rows batched into one SDPA call."""

    name = "torch"
    supports_logit_softcap = True

    def forward(self, query, key, value, key_cache, value_cache, metadata, scale,
                sliding_window=None, logit_softcap=None, kv_scales=None):
        k_scale, v_scale = self.scales_for(kv_scales, key_cache)
        torch_ref.write_kv_cache(key, value, key_cache, value_cache, metadata.slot_mapping,
                                 k_scale, v_scale)
        return sdpa_paged_attention(query, key_cache, value_cache, metadata, scale,
                                    sliding_window, logit_softcap,
                                    self.stride_for(sliding_window), k_scale, v_scale)


def _gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B, max_len, Hkv, D]``: each request's first ``max_len`` cached tokens."""
    num_blocks = -(-max_len // cache.shape[1])
    return cache[block_tables[:, :num_blocks].long()].flatten(1, 2)[:, :max_len]


def sdpa_paged_attention(query: torch.Tensor, key_cache: torch.Tensor,
                         value_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                         sliding_window: int | None = None,
                         logit_softcap: float | None = None,
                         attention_stride: int | None = None,
                         k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """``torch_ref.paged_attention`` through SDPA: one call for all decode rows, one per
    multi-token (prefill) request. With ``logit_softcap`` the scores are capped as
    ``c * tanh(s / c)`` before the mask (Gemma 2), which SDPA cannot do; the strided
    pattern is a mask here (the Triton kernels skip what it hides). An FP8 cache is cast
    to the query's dtype (exactly) with ``k_scale`` folded into the softmax scale and
    ``v_scale`` applied to the output, as the Triton kernels do."""
    scale = scale * k_scale
    out = torch.empty_like(query)
    starts = metadata.query_start_loc.tolist()
    lens = metadata.seq_lens.tolist()
    q_lens = [starts[i + 1] - starts[i] for i in range(len(lens))]
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    if decode:
        index = torch.tensor(decode, device=query.device)
        rows = metadata.query_start_loc[index].long()
        seq_lens = metadata.seq_lens[index].long()
        max_len = max(lens[i] for i in decode)
        k = _gather_kv(key_cache, metadata.block_tables[index], max_len)
        v = _gather_kv(value_cache, metadata.block_tables[index], max_len)
        pos = torch.arange(max_len, device=query.device)[None, :]
        mask = pos < seq_lens[:, None]
        if sliding_window is not None:
            mask &= (seq_lens[:, None] - 1 - pos) < sliding_window
        if attention_stride is not None:
            mask &= torch_ref.strided_visible(seq_lens[:, None] - 1 - pos, attention_stride)
        q = query[rows][:, :, None]
        o = _attend(q, k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
                    mask[:, None, None, :], scale, logit_softcap)
        out[rows] = o[:, :, 0]
    for i, n in enumerate(q_lens):
        if n <= 1:
            continue
        seq_len = lens[i]
        k = _gather_kv(key_cache, metadata.block_tables[i:i + 1], seq_len)[0]
        v = _gather_kv(value_cache, metadata.block_tables[i:i + 1], seq_len)[0]
        q_pos = torch.arange(seq_len - n, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= (q_pos - k_pos) < sliding_window
        if attention_stride is not None:
            mask &= torch_ref.strided_visible(q_pos - k_pos, attention_stride)
        q = query[starts[i]:starts[i + 1]].transpose(0, 1)
        o = _attend(q, k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype), mask,
                    scale, logit_softcap)
        out[starts[i]:starts[i + 1]] = o.transpose(0, 1)
    if v_scale != 1.0:
        out.mul_(v_scale)
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            scale: float, logit_softcap: float | None) -> torch.Tensor:
    """Masked attention over ``[..., H, Lq, D]`` queries and ``[..., Hkv, Lk, D]`` keys."""
    if logit_softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=True)
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3)
    v = v.repeat_interleave(group, dim=-3)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    scores = logit_softcap * torch.tanh(scores / logit_softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v
