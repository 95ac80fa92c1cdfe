"""Logits processors that raise on chosen tensor-parallel ranks. They live in a module of
their own, at module level, so a follower process imports them by reference (the way rank 0
hands its registered processors on) without importing a test module."""

from __future__ import annotations

import torch


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def raise_on_followers(logits: torch.Tensor, batch) -> torch.Tensor:
    """Raises while sampling (after the step's collectives) on every rank but rank 0."""
    if rank() != 0:
        raise RuntimeError(f"sampling failed on rank {rank()} alone")
    return logits


def raise_on_rank0(logits: torch.Tensor, batch) -> torch.Tensor:
    """Raises while sampling on rank 0 alone."""
    if rank() == 0:
        raise RuntimeError("sampling failed on rank 0 alone")
    return logits


def raise_on_every_rank(logits: torch.Tensor, batch) -> torch.Tensor:
    raise RuntimeError("sampling failed on every rank")


def refuse_on_followers(params) -> None:
    """A verify hook that raises (not ValueError: no refusal of one request) on every rank
    but rank 0, which admits the request: a follower fails the step before its forward,
    so before the step's first collective, where rank 0 waits."""
    if rank() != 0:
        raise RuntimeError(f"admission failed on rank {rank()} alone")


def keep(logits: torch.Tensor, batch) -> torch.Tensor:
    return logits
