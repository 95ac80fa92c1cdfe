"""Which slice of each full tensor a rank holds, and which models can be sharded.

A sharded parameter carries a ``ShardSpec`` (attribute ``tp_shard``): along one dimension
the full tensor is a concatenation of parts (q, k and v rows of a merged projection; one
part for the others) and the rank holds one slice of each part, concatenated in the same
order. Checkpoint loading (``load_named_weights``) and random weights
(``init_random_weights``) both cut the full tensors through it, so a rank holds exactly the
slices of the weights the single-device model has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ShardPart:
    # Length of the part in the full tensor along the sharded dimension.
    full_size: int
    # First index of the part this rank holds.
    start: int
    # How many indices this rank holds (those past full_size are zero padding).
    size: int


@dataclass(frozen=True)
class ShardSpec:
    dim: int
    parts: tuple[ShardPart, ...]

    def full_shape(self, local_shape: torch.Size) -> tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] = sum(p.full_size for p in self.parts)
        return tuple(shape)

    def part_at(self, full_offset: int) -> int:
        """The index of the part starting at ``full_offset`` of the full tensor."""
        offset = 0
        for index, part in enumerate(self.parts):
            if offset == full_offset:
                return index
            offset += part.full_size
        raise ValueError(f"no sharded part starts at offset {full_offset}.")

    def local_offset(self, index: int) -> int:
        return sum(p.size for p in self.parts[:index])

    def take_part(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of part ``index`` (``tensor`` is the whole part)."""
        part = self.parts[index]
        if tensor.shape[self.dim] != part.full_size:
            raise ValueError(f"expected {part.full_size} entries along dimension {self.dim}, "
                             f"got a tensor of shape {tuple(tensor.shape)}.")
        size = max(min(part.size, part.full_size - part.start), 0)
        piece = tensor.narrow(self.dim, part.start, size)
        if size < part.size:  # zero rows past the end (a vocabulary padded to the ranks)
            pad = [0, 0] * (tensor.dim() - 1 - self.dim % tensor.dim()) + [0, part.size - size]
            piece = F.pad(piece, pad)
        return piece

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the whole (merged) full tensor."""
        sizes = [p.full_size for p in self.parts]
        pieces = full.split(sizes, dim=self.dim)
        return torch.cat([self.take_part(i, p) for i, p in enumerate(pieces)], dim=self.dim)


def even_part(full_size: int, rank: int, world_size: int) -> ShardPart:
    """Rank ``rank``'s equal share of ``full_size`` (which ``world_size`` divides)."""
    size = full_size // world_size
    return ShardPart(full_size, rank * size, size)


def padded_part(full_size: int, rank: int, world_size: int) -> ShardPart:
    """Rank ``rank``'s share of ``full_size`` rounded up to a multiple of ``world_size``."""
    size = -(-full_size // world_size)
    return ShardPart(full_size, rank * size, size)


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank computes."""

    num_heads: int
    num_kv_heads: int
    # First query head and first KV head of the rank in the full model.
    head_start: int
    kv_head_start: int


def shard_heads(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadShard:
    """Query heads split evenly; KV heads split too, or (fewer KV heads than ranks) the
    one KV head of the rank's query group replicated on every rank of that group."""
    heads = num_heads // world_size
    if num_kv_heads >= world_size:
        kv_heads = num_kv_heads // world_size
        return HeadShard(heads, kv_heads, rank * heads, rank * kv_heads)
    return HeadShard(heads, 1, rank * heads, rank * num_kv_heads // world_size)


def check_tensor_parallel(hf_config, architecture: str, model_cls: type,
                          tensor_parallel_size: int) -> None:
    """ValueError naming tensor_parallel_size if the model cannot be split that way."""
    size = tensor_parallel_size
    if size == 1:
        return
    if not getattr(model_cls, "supports_tensor_parallel", False):
        raise ValueError(f"tensor_parallel_size={size}: {architecture} is not sharded yet "
                         "(docs/parallelism.md lists the sharded architectures); serve it "
                         "with tensor_parallel_size=1.")
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    if num_heads % size:
        raise ValueError(f"tensor_parallel_size must divide the model's "
                         f"{num_heads} attention heads, got {size}.")
    if num_kv_heads % size and size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size must divide the model's {num_kv_heads} KV "
                         f"heads or be a multiple of them, got {size}.")
    # OPT names its MLP width ffn_dim.
    width = "intermediate_size" if hasattr(hf_config, "intermediate_size") else "ffn_dim"
    intermediate = getattr(hf_config, width)
    if intermediate % size:
        raise ValueError(f"tensor_parallel_size must divide the model's {width} "
                         f"{intermediate}, got {size}.")
