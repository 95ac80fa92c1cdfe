"""The tensor-parallel group of this process and the collectives the sharded layers use.

A process belongs to at most one tensor-parallel group (torch.distributed's default group:
NCCL on CUDA, gloo on CPU). Layers read the group when they are built (``building``), so a
model built outside that context (every ``tensor_parallel_size=1`` model) is the plain
single-device model, with no collective anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

logger = logging.getLogger(__name__)

# NVLink multicast (NVLS) stays off in every rank: on a shared host it can take the GPUs
# out of service. Set before NCCL (or torch's symmetric memory, or NVSHMEM) initialises.
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                        "NVSHMEM_DISABLE_NVLS": "1"}


def disable_nvlink_multicast() -> None:
    """Set ``NVLINK_MULTICAST_OFF`` in this process's environment (children inherit it)."""
    os.environ.update(NVLINK_MULTICAST_OFF)


@dataclass(frozen=True)
class ParallelState:
    """One rank's place in its tensor-parallel group (rank 0 of 1: no group)."""

    rank: int = 0
    world_size: int = 1
    # The torch.distributed process group (None when world_size is 1).
    group: Any = None
    # "nccl" or "gloo" ("" without a group).
    backend: str = ""

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (row-parallel outputs, the vocab embedding)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension (vocab-parallel logits)."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        if self.backend == "nccl":
            out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
            torch.distributed.all_gather_into_tensor(out, x, group=self.group)
            parts = out.unbind(0)
        else:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` over the ranks (the KV capacity every rank can hold)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return int(t.item())


SINGLE = ParallelState()
# This process's group once init_tensor_parallel ran.
_process_state = SINGLE
# The group the model being built shards over (see ``building``).
_building = SINGLE


def init_tensor_parallel(rank: int, world_size: int, backend: str, store: Any,
                         timeout_s: float = 1800.0) -> ParallelState:
    """Join the process group of ``world_size`` ranks through ``store`` (a TCPStore).

    Raises:
        RuntimeError: this process already belongs to a tensor-parallel group.
    """
    global _process_state
    if _process_state.is_parallel or torch.distributed.is_initialized():
        raise RuntimeError("this process already runs a tensor-parallel engine "
                           "(tensor_parallel_size > 1): shut it down first.")
    disable_nvlink_multicast()
    torch.distributed.init_process_group(backend, store=store, rank=rank,
                                         world_size=world_size,
                                         timeout=timedelta(seconds=timeout_s))
    _process_state = ParallelState(rank, world_size, torch.distributed.group.WORLD, backend)
    logger.info("tensor-parallel rank %d of %d joined its group (%s)", rank, world_size,
                backend)
    return _process_state


def destroy_tensor_parallel() -> None:
    """Leave the group (a later engine of this process may form a new one)."""
    global _process_state
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group whose peers died may not tear down cleanly
            logger.warning("destroying the tensor-parallel group failed", exc_info=True)
    _process_state = SINGLE


def abort_tensor_parallel() -> None:
    """Make collectives blocked on a lost rank fail instead of waiting (NCCL; a gloo
    collective fails by itself once its peer's connection closes)."""
    if _process_state.backend != "nccl":
        return
    try:
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
    except Exception:  # noqa: BLE001 - best effort: the process may be exiting anyway
        logger.warning("aborting the NCCL group failed", exc_info=True)


def is_tensor_parallel_process() -> bool:
    """True while this process is a rank of a tensor-parallel group."""
    return _process_state.is_parallel


def state_for(tensor_parallel_size: int) -> ParallelState:
    """The group a model of ``tensor_parallel_size`` shards over in this process.

    Raises:
        RuntimeError: ``tensor_parallel_size`` > 1 but this process is not a rank of such
            a group (models are sharded only under worker_svc.ranks.launch).
    """
    if tensor_parallel_size == 1:
        return SINGLE
    if _process_state.world_size != tensor_parallel_size:
        raise RuntimeError(f"tensor_parallel_size={tensor_parallel_size} needs a process "
                           f"group of that size; this process has "
                           f"{_process_state.world_size} rank(s) (start the engine through "
                           "worker_svc.ranks.launch.build_runner).")
    return _process_state


@contextlib.contextmanager
def building(state: ParallelState) -> Iterator[ParallelState]:
    """Layers built inside shard over ``state`` (see ``current``)."""
    global _building
    previous, _building = _building, state
    try:
        yield state
    finally:
        _building = previous


def current() -> ParallelState:
    """The group of the model being built (SINGLE outside ``building``)."""
    return _building
