"""Mapping HF checkpoint tensor names onto a model's (partly merged) parameters."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       stacked: dict[str, tuple[str, int]], skip: tuple[str, ...] = ()
                       ) -> set[str]:
    """Copy HF tensors into ``model``'s parameters.

    Args:
        model: the module whose ``named_parameters`` are the targets.
        weights: ``(hf_name, tensor)`` pairs.
        stacked: ``hf_part -> (merged_part, row_offset)``: e.g. ``"q_proj" -> ("qkv_proj", 0)``
            puts ``...q_proj.weight`` into rows ``0:n`` of ``...qkv_proj.weight``.
        skip: substrings of HF names to ignore (rotary buffers, tied heads).
    Returns:
        The names of the model parameters that were written.
    Raises:
        ValueError: a tensor has no target or the wrong shape.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for hf_name, tensor in weights:
        if any(s in hf_name for s in skip):
            continue
        name, offset = hf_name, None
        for part, (merged, row_offset) in stacked.items():
            if f".{part}." in hf_name:
                name, offset = hf_name.replace(f".{part}.", f".{merged}."), row_offset
                break
        if name not in params:
            raise ValueError(f"checkpoint tensor {hf_name!r} matches no parameter of "
                             f"{type(model).__name__}.")
        param = params[name]
        shard = getattr(param, "tp_shard", None)
        if shard is not None:
            # A tensor-parallel rank keeps its slice of the part (full-model coordinates).
            index = shard.part_at(offset or 0)
            tensor = _take_part(hf_name, shard, index, tensor)
            offset = None if offset is None else shard.local_offset(index)
        with torch.no_grad():
            if offset is None:
                if param.shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has shape "
                                     f"{tuple(tensor.shape)}, expected {tuple(param.shape)}.")
                param.copy_(tensor)
            else:
                rows = param[offset:offset + tensor.shape[0]]
                if rows.shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has shape "
                                     f"{tuple(tensor.shape)}, expected {tuple(rows.shape)}.")
                rows.copy_(tensor)
        loaded.add(name)
    return loaded


def _take_part(hf_name: str, shard, index: int, tensor: torch.Tensor) -> torch.Tensor:
    try:
        return shard.take_part(index, tensor)
    except ValueError as exc:
        raise ValueError(f"checkpoint tensor {hf_name!r}: {exc}") from None


def check_all_loaded(model: nn.Module, loaded: set[str]) -> None:
    """Raise ValueError naming the parameters no checkpoint tensor filled."""
    missing = sorted(n for n, _ in model.named_parameters() if n not in loaded)
    if missing:
        raise ValueError(f"checkpoint is missing weights for {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}.")
