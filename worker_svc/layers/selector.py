"""Picks the attention backend: triton on CUDA, torch elsewhere (or as configured)."""

from __future__ import annotations

import torch

from worker_svc.layers.attention import AttentionBackend


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` picks triton on CUDA and torch elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from worker_svc.layers.torch_attention import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from worker_svc.layers.triton_attention import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be 'torch' or 'triton', got {name!r}.")
