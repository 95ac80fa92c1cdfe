"""Rotary position embedding with a precomputed cos/sin cache (torch_ref layout)."""

from __future__ import annotations

import torch
from torch import nn

from worker_svc.layers import ops


def _rope_parameters(config) -> dict:
    """The rope settings of ``config`` in transformers v5 form (``rope_parameters``), also
    accepting the older ``rope_theta`` / ``rope_scaling`` fields."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def compute_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float, int]:
    """Inverse frequencies exactly as transformers computes them for ``config``.

    Returns:
        ``(inv_freq[rot_dim // 2] float32, attention_scaling, rot_dim)``.
    """
    params = _rope_parameters(config)
    rope_type = params["rope_type"]
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if rope_type == "default":
        rot_dim = int(head_dim * (factor or 1.0))
        base = float(params["rope_theta"])
        exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
        inv_freq = 1.0 / (base ** exponents)
        return inv_freq, 1.0, rot_dim
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported.")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return inv_freq.float(), float(scaling), 2 * inv_freq.shape[0]


class RotaryEmbedding(nn.Module):
    """Rotates q/k by position; holds ``cos_sin_cache[max_position, rot_dim]`` (float32)."""

    cos_sin_cache: torch.Tensor

    def __init__(self, config, head_dim: int, max_position: int, is_neox_style: bool = True):
        super().__init__()
        inv_freq, scaling, self.rot_dim = compute_inv_freq(config, head_dim)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        cache = torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)
        self.is_neox_style = is_neox_style
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            positions: ``[T]``; query ``[T, H, D]``; key ``[T, Hkv, D]``.
        Returns:
            Rotated ``(query, key)``.
        """
        return ops.rotary_embedding(positions, query, key, self.cos_sin_cache,
                                          self.is_neox_style)
