"""Picks the attention backend: triton on CUDA, torch elsewhere (or as configured)."""

from __future__ import annotations

import torch

from worker_svc.layers.attention import AttentionBackend


def get_attention_backend(name: str, device: torch.device,
                          sparse_attention: str | None = None) -> AttentionBackend:
    """``auto`` picks triton on CUDA and torch elsewhere; ``sparse_attention`` as in
    ``ModelConfig``."""
    from gridllm.common.config import parse_sparse_attention

    pattern = parse_sparse_attention(sparse_attention)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from worker_svc.layers.torch_attention import TorchAttentionBackend

        return TorchAttentionBackend(pattern)
    if name == "triton":
        from worker_svc.layers.triton_attention import TritonAttentionBackend

        return TritonAttentionBackend(pattern)
    raise ValueError(f"attention_backend must be 'torch' or 'triton', got {name!r}.")
