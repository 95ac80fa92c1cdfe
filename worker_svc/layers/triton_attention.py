"""Attention backend on Triton kernels (CUDA; also runs in Triton's interpreter)."""

from __future__ import annotations

import torch

from kernels.kv_cache_write import write_kv_cache
from kernels.paged_decode_attention import paged_decode_attention
from kernels.prefill_attention import prefill_attention
from kernels.rotary_kv_cache_write import rotary_kv_cache_write
from worker_svc.layers.attention import AttentionBackend, AttentionMetadata, RotaryLike


class TritonAttentionBackend(AttentionBackend):
    """Writes the step's KV with the cache-write kernel (fused with the rotary embedding
    when the model rotates through ``forward_rotary``), then runs the split-KV decode
    kernel for decode-only steps (the CUDA-graph path) and the varlen prefill kernel for
    anything with a longer query chunk."""

    name = "triton"
    supports_logit_softcap = True
    # While a forward is captured into CUDA graphs cut at attention
    # (worker_svc.piecewise_graph.Capture): each call writes the cache inside the graph at
    # the capture's static slots, then ends the graph, its attention to run eagerly
    # between graphs at replay.
    piecewise = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None,
                logit_softcap: float | None = None,
                kv_scales: tuple[float, float] | None = None, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``AttentionBackend.forward``; ``out``: ``[T, H, D]`` to write into (a view of a
        larger buffer is fine), instead of a new tensor."""
        k_scale, v_scale = self.scales_for(kv_scales, key_cache)
        write_kv_cache(key, value, key_cache, value_cache, self._slots(metadata),
                       k_scale, v_scale)
        return self._attend_or_cut(query, key_cache, value_cache, metadata, scale,
                                   sliding_window, logit_softcap, k_scale, v_scale, out)

    def forward_rotary(self, positions: torch.Tensor, rotary: RotaryLike, query: torch.Tensor,
                       key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                       sliding_window: int | None = None,
                       logit_softcap: float | None = None,
                       kv_scales: tuple[float, float] | None = None, *,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """``AttentionBackend.forward_rotary``; ``out`` as in ``forward``."""
        k_scale, v_scale = self.scales_for(kv_scales, key_cache)
        # One launch rotates the queries and writes rotated keys and values to the cache.
        rotary_kv_cache_write(positions, query, key, value, key_cache, value_cache,
                              self._slots(metadata), rotary.cos_sin_cache,
                              rotary.is_neox_style, k_scale, v_scale)
        return self._attend_or_cut(query, key_cache, value_cache, metadata, scale,
                                   sliding_window, logit_softcap, k_scale, v_scale, out)

    def _slots(self, metadata: AttentionMetadata) -> torch.Tensor:
        """Where this call writes the step's keys and values: the step's slots, or while a
        capture is on, its static slot buffer (filled before each replay)."""
        if self.piecewise is None:
            return metadata.slot_mapping
        return self.piecewise.slot_mapping(metadata)

    def _attend_or_cut(self, query: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                       sliding_window: int | None, logit_softcap: float | None,
                       k_scale: float, v_scale: float,
                       out: torch.Tensor | None) -> torch.Tensor:
        """The attention after the cache write: now, or while a capture is on, handed to
        it (the write is in the graph already) to run between graphs at replay."""
        if self.piecewise is None:
            return self._attend(query, key_cache, value_cache, metadata, scale,
                                sliding_window, logit_softcap, k_scale, v_scale, out)
        return self.piecewise.cut(
            lambda q, meta, o, check: self._attend(q, key_cache, value_cache, meta, scale,
                                                   sliding_window, logit_softcap, k_scale,
                                                   v_scale, o, check),
            query, metadata)

    def _attend(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float, sliding_window: int | None,
                logit_softcap: float | None = None, k_scale: float = 1.0,
                v_scale: float = 1.0, out: torch.Tensor | None = None,
                check: bool = True) -> torch.Tensor:
        stride = self.stride_for(sliding_window)
        # The decode kernel wants exactly one query row per request; anything else
        # (e.g. padded rows without padded seq_lens) takes the general kernel.
        if metadata.is_decode_only and query.shape[0] == metadata.num_reqs:
            return paged_decode_attention(query, key_cache, value_cache,
                                          metadata.block_tables, metadata.seq_lens,
                                          metadata.query_start_loc, scale, sliding_window,
                                          max_seq_len=metadata.max_seq_len,
                                          logit_softcap=logit_softcap,
                                          attention_stride=stride, k_scale=k_scale,
                                          v_scale=v_scale, out=out, check=check)
        return prefill_attention(query, key_cache, value_cache, metadata.block_tables,
                                 metadata.seq_lens, metadata.query_start_loc, scale,
                                 sliding_window, max_query_len=metadata.max_query_len,
                                 logit_softcap=logit_softcap, attention_stride=stride,
                                 k_scale=k_scale, v_scale=v_scale,
                                 batch_cache=metadata.kernel_cache,
                                 # Nothing to split off without one-query requests.
                                 split_one_token=False if metadata.num_one_token == 0
                                 else None,
                                 one_token_prefix=metadata.one_token_prefix, out=out,
                                 check=check, max_seq_len=metadata.max_seq_len)
