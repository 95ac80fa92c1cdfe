"""Megatron-style sharded layers; built outside a tensor-parallel group they are the plain
torch layers (same parameters, same math).

- ``ColumnParallelLinear``: each rank holds a slice of the output features (of each part of
  a merged projection: q/k/v, gate/up); the output stays sharded, no communication.
- ``RowParallelLinear``: each rank holds a slice of the input features, takes the sharded
  input of a column-parallel layer and sums the partial outputs with one all-reduce.
- ``VocabParallelEmbedding``: each rank holds a slice of the vocabulary (padded to a
  multiple of the ranks); a token outside it looks up zeros, one all-reduce sums.
- ``ParallelLMHead``: the logits of the rank's vocabulary slice, all-gathered to the full
  vocabulary on every rank (every rank samples; see worker_svc/ranks/launch.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker_svc.layers import ops
from worker_svc.parallel.sharding import ShardPart, ShardSpec, even_part, padded_part
from worker_svc.parallel.state import ParallelState, current


def _mark(param: nn.Parameter | None, spec: ShardSpec) -> None:
    if param is not None:
        param.tp_shard = spec  # type: ignore[attr-defined]


class ColumnParallelLinear(nn.Linear):
    """Args:
        in_features: input features (every rank sees all of them).
        parts: each part's slice of the output features: (full size, this rank's start,
            this rank's size); the local output is the slices concatenated.
        bias: whether each output feature has a bias (sharded with it).
    """

    def __init__(self, in_features: int, parts: list[ShardPart], bias: bool):
        super().__init__(in_features, sum(p.size for p in parts), bias=bias)
        self.tp = current()
        if self.tp.is_parallel:
            spec = ShardSpec(0, tuple(parts))
            _mark(self.weight, spec)
            _mark(self.bias, spec)

    @classmethod
    def merged(cls, in_features: int, full_sizes: list[int], bias: bool
               ) -> ColumnParallelLinear:
        """Equal slices of every part (gate/up: ``[intermediate, intermediate]``)."""
        tp = current()
        return cls(in_features, [even_part(n, tp.rank, tp.world_size) for n in full_sizes],
                   bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu_and_mul(forward(x))`` for the merged ``[gate | up]`` projection (each
        rank's slice is ``[gate_r | up_r]``); one kernel at decode."""
        return ops.linear_silu_and_mul(x, self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """A linear layer whose input features are split over the ranks; the partial outputs
    are summed (all-reduce).

    Args:
        full_in_features: input features of the single-device layer (each rank holds an
            equal slice, the output of a column-parallel layer).
        out_features: output features (every rank gets the summed output).
        bias: added once, on rank 0 before the sum (the bias is replicated).
    """

    def __init__(self, full_in_features: int, out_features: int, bias: bool):
        tp = current()
        part = even_part(full_in_features, tp.rank, tp.world_size)
        super().__init__(part.size, out_features, bias=bias)
        self.tp = tp
        # Read by layers that replace this one (FP8) and must keep the sum.
        self.is_row_parallel = True
        if tp.is_parallel:
            _mark(self.weight, ShardSpec(1, (part,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tp.is_parallel:
            return ops.linear(x, self.weight, self.bias)
        out = ops.linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        return self.tp.all_reduce(out)


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        tp = current()
        part = padded_part(num_embeddings, tp.rank, tp.world_size)
        super().__init__(part.size, embedding_dim)
        self.tp = tp
        self.vocab_start = part.start
        # Real (unpadded) rows of this rank's slice.
        self.num_real = max(min(part.size, num_embeddings - part.start), 0)
        if tp.is_parallel:
            _mark(self.weight, ShardSpec(0, (part,)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.is_parallel:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_real)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(nn.Linear):
    """``[N, hidden] -> [N, vocab]`` on every rank (no bias). Tie it to an embedding by
    assigning the embedding's weight: both are sharded the same way."""

    def __init__(self, hidden_size: int, vocab_size: int):
        tp = current()
        part = padded_part(vocab_size, tp.rank, tp.world_size)
        super().__init__(hidden_size, part.size, bias=False)
        self.tp: ParallelState = tp
        self.vocab_size = vocab_size
        # The row stride of the logits forward returns: the vocabulary padded to the ranks.
        self.logits_width = part.size * tp.world_size
        if tp.is_parallel:
            _mark(self.weight, ShardSpec(0, (part,)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = ops.linear(hidden, self.weight)
        if not self.tp.is_parallel:
            return logits
        return self.tp.all_gather(logits)[..., :self.vocab_size]
