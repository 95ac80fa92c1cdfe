"""A follower rank (1 .. T-1) of a tensor-parallel engine: it builds the same ModelRunner
as rank 0 over its own shard, then runs every step rank 0 sends it, in order.

It keeps no output: rank 0 answers. A step that raises is reported to rank 0 (the step's
number and the traceback), which stops the whole group unless its own step raised too (a bad
step every rank fails alike leaves the group in step). It exits when rank 0 says stop, or as
soon as rank 0 is gone (its pipes from rank 0 close), even in the middle of a step.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import traceback
import zlib
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from worker_svc.logits_processors import register_logits_processor, registered_logits_processors
from worker_svc.model_runner import ModelRunner
from worker_svc.parallel.state import (
    destroy_tensor_parallel,
    disable_nvlink_multicast,
    init_tensor_parallel,
)

logger = logging.getLogger(__name__)

# Exit status of a follower whose batch differs from rank 0's.
EXIT_DIVERGED = 3
# Seconds a follower waits to reach rank 0's rendezvous store.
STORE_TIMEOUT_S = 120.0


@dataclass
class FollowerArgs:
    """What rank 0 gives a follower (pickled into the new process)."""

    rank: int
    world_size: int
    # Port of rank 0's TCPStore on loopback (the rendezvous of the process group).
    store_port: int
    backend: str
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    eos_token_id: int | None
    # Logits processors rank 0 has that a fresh process lacks: (name, fn, verify).
    extra_processors: list[tuple[str, Any, Any]]
    # GRIDLLM_LOGGING_LEVEL / format of rank 0, so the follower logs alike.
    log_env: dict[str, str]


def run_follower(args: FollowerArgs, steps: Connection, status: Connection,
                 reports: Connection, alive: Connection) -> None:
    """The follower process's main (a multiprocessing target).

    Args:
        args: rank, group and the engine's configs.
        steps: rank 0's messages: ``("step", SchedulerOutput, rows digest, step number)``,
            ``("reset",)``, ``("eos", id)``, ``("stop",)``.
        status: tells rank 0 ``("up",)`` before joining the group, or ``("error", text)``.
        reports: tells rank 0 ``("step_failed", step number, traceback)`` for each step
            that raised.
        alive: never carries data; its end of file means rank 0 is gone.
    """
    os.environ.update(args.log_env)
    disable_nvlink_multicast()
    # Rank 0 alone handles signals sent to its process group (see forkserver_preload.py).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from gridllm.common.logger import configure_logging

    configure_logging()
    threading.Thread(target=_exit_with_rank0, args=(alive,), daemon=True,
                     name="rank0-watch").start()
    try:
        runner = _build_runner(args, status)
    except BaseException:  # noqa: BLE001 - reported to rank 0, which raises it
        status.send(("error", traceback.format_exc()))
        os._exit(1)
    status.close()
    logger.info("tensor-parallel rank %d of %d ready (%d KV blocks)", args.rank,
                args.world_size, runner.num_kv_blocks)
    _serve(runner, steps, reports, args.rank)
    destroy_tensor_parallel()


def _build_runner(args: FollowerArgs, status: Connection) -> ModelRunner:
    device = args.model_config.device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    else:
        # The ranks share the host's cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    known = set(registered_logits_processors())
    for name, fn, verify in args.extra_processors:
        if name not in known:
            register_logits_processor(name, verify=verify)(fn)
    store = torch.distributed.TCPStore("127.0.0.1", args.store_port, args.world_size,
                                       is_master=False,
                                       timeout=_seconds(STORE_TIMEOUT_S))
    status.send(("up",))
    init_tensor_parallel(args.rank, args.world_size, args.backend, store)
    return ModelRunner(args.model_config, args.cache_config, args.scheduler_config,
                       eos_token_id=args.eos_token_id)


def _serve(runner, steps: Connection, reports: Connection, rank: int) -> None:
    while True:
        try:
            message = pickle.loads(steps.recv_bytes())
        except (EOFError, OSError):
            logger.warning("rank %d: rank 0 is gone; exiting", rank)
            return
        kind = message[0]
        if kind == "stop":
            return
        if kind == "step":
            _, scheduler_output, rank0_rows, step_number = message
            try:
                _check_rows(runner, rank0_rows, rank)
                # Outputs are not read here: the runner reads a step's output itself
                # before it needs it (two steps later, or for logits processors).
                runner.execute_model_async(scheduler_output)
            except Exception:  # noqa: BLE001 - rank 0 checks that its own step raised too
                logger.warning("rank %d: step %d failed", rank, step_number, exc_info=True)
                try:
                    reports.send(("step_failed", step_number, traceback.format_exc()))
                except OSError:
                    return  # rank 0 is gone
            continue
        try:
            if kind == "reset":
                runner.reset_requests()
            elif kind == "eos":
                runner.eos_token_id = message[1]
        except Exception:  # noqa: BLE001 - rank 0 raised the same error and reports it
            logger.warning("rank %d: %s failed (rank 0 reports it)", rank, kind,
                           exc_info=True)


def _check_rows(runner: ModelRunner, rank0_rows: int, rank: int) -> None:
    """Exit if this rank's batch rows differ from rank 0's: the ranks would pair up the
    partial sums of different tokens and generate garbage. The exit takes the engine down
    (rank 0's monitor)."""
    if rows_digest(runner.input_batch.req_ids) != rank0_rows:
        logger.critical("rank %d: batch rows %s differ from rank 0's; the ranks diverged",
                        rank, runner.input_batch.req_ids)
        os._exit(EXIT_DIVERGED)


def rows_digest(req_ids: list[str]) -> int:
    """A digest of a batch's rows in order (the same in every process, unlike hash())."""
    return zlib.crc32("\0".join(req_ids).encode())


def _exit_with_rank0(alive: Connection) -> None:
    try:
        alive.recv_bytes()
    except (EOFError, OSError):
        pass
    # Rank 0 is gone: a collective in flight would never complete.
    os._exit(0)


def _seconds(value: float):
    from datetime import timedelta

    return timedelta(seconds=value)
