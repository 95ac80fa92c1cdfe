"""Small model layers that route their math through the swappable reference ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker_svc.layers import ops


class RMSNorm(nn.Module):
    """RMSNorm (transformers' Llama flavour); optionally fuses the residual add."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Returns ``normed`` or, with ``residual``, ``(normed, x + residual)``."""
        return ops.rms_norm(x, self.weight, self.eps, residual)


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` on a merged ``[..., 2 * d]`` gate/up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


def get_activation(name: str):
    """The elementwise activation called ``name`` in HF configs."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation_function must be one of {sorted(_ACTIVATIONS)}, "
                         f"got {name!r}.")
    return _ACTIVATIONS[name]


def load_stacked(param: torch.Tensor, loaded: torch.Tensor, offset: int) -> None:
    """Copy ``loaded`` into rows ``offset:offset + len(loaded)`` of a merged projection."""
    param.data[offset:offset + loaded.shape[0]].copy_(loaded)
