"""Attention over the paged KV cache, behind a backend interface.

A backend takes a step's packed queries/keys/values, writes the new KV through the slot
mapping and attends over each request's cached context. The torch backend
(``torch_attention``) runs the reference ops (CPU); the Triton backend (``triton_attention``)
runs on CUDA; ``selector.get_attention_backend`` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from kernels.fp8 import is_fp8


@dataclass
class AttentionMetadata:
    """Per-step layout of the packed batch, shared by every layer."""

    # [T] int64: cache slot of each new token (-1 for padding).
    slot_mapping: torch.Tensor
    # [B + 1] int32: request i owns query rows query_start_loc[i]:query_start_loc[i+1].
    query_start_loc: torch.Tensor
    # [B] int32: tokens of each request in the cache after this step's writes.
    seq_lens: torch.Tensor
    # [B, max_blocks] int32: each request's block table (padded with 0).
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # With several KV groups (worker_svc/kv_groups.py): each group's view of the step
    # (its own slot mapping and block tables, the rest shared; the first is this one).
    # A layer attends through the view of its group. None: one group.
    groups: list[AttentionMetadata] | None = None
    # Requests with one query in this step, where the host knows (None: unknown): a
    # step without any need not split them off its prefill kernel (split_one_token).
    num_one_token: int | None = None
    # How many requests the host knows to be the step's one-query requests, all of them
    # and all first (0: not known, or not so): the split reads and writes their rows in
    # place instead of gathering and scattering them.
    one_token_prefix: int = 0
    # What a kernel derives from the step's layout once for all its layers (the prefill
    # kernels' query tiles, the one-query requests' rows); shared with the group views,
    # whose layout is the same.
    kernel_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend:
    """Writes new KV and computes attention; one instance per model.

    Args:
        sparse_attention: ``(pattern, size)`` from ``config.parse_sparse_attention``: a
            sparse pattern for the layers that have no window of their own.
    """

    name = "base"
    # Scales of an FP8 KV cache (the cache holds k / k_scale and v / v_scale; ignored by
    # other caches) for layers without their own (``kv_scales`` of ``forward``: an FP8
    # checkpoint's calibrated scales, or calculate_kv_scales'). 1.0, as vLLM uses when a
    # checkpoint carries no calibrated scales: keys and values of most models stay far
    # inside e4m3's +-448 range, where the relative rounding error (2^-4) does not depend
    # on the scale (e5m2's range is +-57344).
    k_scale: float = 1.0
    v_scale: float = 1.0
    # Whether forward() takes logit_softcap (Gemma 2's tanh capping of attention scores).
    supports_logit_softcap = False

    def __init__(self, sparse_attention: tuple[str, int] | None = None):
        self.sparse_attention = sparse_attention

    def layer_window(self, sliding_window: int | None) -> int | None:
        """A layer's window under the backend's pattern (``local`` narrows it)."""
        if self.sparse_attention is None or self.sparse_attention[0] != "local":
            return sliding_window
        size = self.sparse_attention[1]
        return size if sliding_window is None else min(sliding_window, size)

    def stride_for(self, sliding_window: int | None) -> int | None:
        """The strided pattern's stride for a layer with this window (None: not strided;
        a layer with its own window keeps it)."""
        if (self.sparse_attention is None or self.sparse_attention[0] != "strided"
                or sliding_window is not None):
            return None
        return self.sparse_attention[1]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None,
                logit_softcap: float | None = None,
                kv_scales: tuple[float, float] | None = None) -> torch.Tensor:
        """Args:
            query: ``[T, H, D]``; key, value: ``[T, Hkv, D]`` (already rotated).
            key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]`` of this layer,
                in the model's dtype, float8_e4m3fn or float8_e5m2 (scaled by
                ``k_scale``/``v_scale``).
            sliding_window: this layer's window (a query at ``q`` sees keys ``q - k < w``).
            logit_softcap: if set, scores become ``c * tanh(scores / c)`` before the mask.
            kv_scales: this layer's ``(k_scale, v_scale)`` for an FP8 cache; None: the
                backend's.
        Returns:
            ``[T, H, D]`` attention output.
        """
        raise NotImplementedError

    def forward_rotary(self, positions: torch.Tensor, rotary: RotaryLike, query: torch.Tensor,
                       key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                       sliding_window: int | None = None,
                       logit_softcap: float | None = None,
                       kv_scales: tuple[float, float] | None = None) -> torch.Tensor:
        """``forward`` after rotating ``query``/``key`` by ``rotary`` at ``positions``;
        a backend may fuse the rotation into its KV write (``query`` may be rotated in
        place)."""
        query, key = rotary(positions, query, key)
        if logit_softcap is None and kv_scales is None:
            return self.forward(query, key, value, key_cache, value_cache, metadata, scale,
                                sliding_window)
        return self.forward(query, key, value, key_cache, value_cache, metadata, scale,
                            sliding_window, logit_softcap, kv_scales)

    def scales_for(self, kv_scales: tuple[float, float] | None, key_cache: torch.Tensor
                   ) -> tuple[float, float]:
        """A layer's ``(k_scale, v_scale)`` over ``key_cache``: for an FP8 cache its own,
        else the backend's; 1.0 for a cache in the model's dtype (which holds k and v)."""
        if not is_fp8(key_cache.dtype):
            return (1.0, 1.0)
        return (self.k_scale, self.v_scale) if kv_scales is None else kv_scales


class RotaryLike(Protocol):
    """A rotary embedding (``worker_svc.layers.rotary.RotaryEmbedding``)."""

    cos_sin_cache: torch.Tensor
    is_neox_style: bool

    def __call__(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...
