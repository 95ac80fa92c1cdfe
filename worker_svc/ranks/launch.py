"""Build the engine's model runner: one ModelRunner, or a tensor-parallel group of them.

With ``tensor_parallel_size=T`` > 1 the caller's process (the worker service, or the
in-process ``LLM``) is rank 0 and starts T - 1 follower processes (forked from a
multiprocessing forkserver that has imported torch once). Every rank builds the same
ModelRunner over its shard of the model; rank 0's is the one the caller drives, through
``TensorParallelRunner``, which has the ModelRunner's interface.

One step: rank 0 pickles the SchedulerOutput once and writes it to every follower's pipe,
then every rank runs the same step: the same per-request state updates, the same forward
(whose all-reduces pair up across the ranks) and the same sampling. The LM head's logits are
all-gathered, so every rank holds the full logits and samples the same ids with the same
counter-based seeds (Philox keyed by the request's seed and the output position; unseeded
requests draw their key from a generator seeded alike on every rank), then feeds them to
its own next step. No sampled id travels between ranks; only rank 0's output is read.

Failure: a monitor thread in rank 0 waits on every follower. One that exits while the
engine runs has the others killed and ``on_rank_lost`` called (the worker service exits, so
its scheduler migrates its requests; the ``LLM`` raises on its next step). A follower exits
when rank 0 dies: the pipes from rank 0 close.

Steps are numbered. A step that raises on every rank (a bad step: a logits processor that
raises, say) is raised by rank 0 and leaves the group in step. A step that raises on some
ranks only stops the engine alike, since the ranks have diverged or wait in a collective
the failed one never reaches: a follower reports each step that raised (its number and
traceback) and the monitor, unless rank 0 raised that step too within
``_STEP_FAILURE_GRACE_S``, stops the group with an error naming the rank and its exception
(rank 0, stuck in that collective, then fails with it); a step that raised on rank 0 waits
as long for every follower's report of it, and stops the group if one is missing.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import pickle
import random
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from gridllm.common.procs import HAS_PROC, is_running
from worker_svc.parallel.state import (
    abort_tensor_parallel,
    destroy_tensor_parallel,
    disable_nvlink_multicast,
    init_tensor_parallel,
    is_tensor_parallel_process,
)
from worker_svc.ranks.follower import FollowerArgs, rows_digest, run_follower
from worker_svc.torch_utils import resolve_device

logger = logging.getLogger(__name__)

# Seconds rank 0 waits for the followers to start (import, fork) and reach the store.
START_TIMEOUT_S = 300.0
# Seconds a stopping follower may take before it is killed.
STOP_TIMEOUT_S = 10.0
# How long the watcher waits, once a rank is gone, for the others that follow it.
_CAUSE_GRACE_S = 0.2
# How long, past that grace period, an error that a lost follower caused (a failed write,
# a failed collective) waits for the monitor to name the lost rank: a loaded host may run
# the monitor's thread late, and the wait only happens once a follower is gone.
_CAUSE_MARGIN_S = 5.0
# How long a step that raised on one rank waits for the others to report the same step
# raised (they run it in step, so they raise within moments); past it, the engine is lost.
_STEP_FAILURE_GRACE_S = 5.0
# How often the monitor looks whether rank 0 has finished a step a follower reported.
_POLL_S = 0.01
# Rank 0's latest failed step numbers kept for the followers' reports (which arrive within
# _STEP_FAILURE_GRACE_S of the step, long before this many steps have run).
_MAX_FAILED_STEPS = 64
_LOG_ENV = ("GRIDLLM_LOGGING_LEVEL", "GRIDLLM_LOG_FORMAT", "GRIDLLM_TRACE_FUNCTION")


def _exited(process: Any) -> bool:
    """Whether a follower process has exited: its exit code is known, or (Linux) its /proc
    entry is gone or a zombie's. A forkserver's child's exit code reaches this process
    only once the forkserver has reaped the child and written it back, which on a loaded
    host may come after the error the death caused."""
    if process.exitcode is not None:
        return True
    return HAS_PROC and process.pid is not None and not is_running(process.pid)


def build_runner(model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, eos_token_id: int | None = None,
                 on_rank_lost: Callable[[str], None] | None = None):
    """A ModelRunner, or with ``tensor_parallel_size`` > 1 a TensorParallelRunner.

    Args:
        model_config, cache_config, scheduler_config, eos_token_id: as for ModelRunner.
        on_rank_lost: called with what happened when a follower rank dies while the
            engine runs, or a step raises on some ranks only (from the monitor thread, or
            from the step's); the other ranks are killed already.
    """
    if model_config.tensor_parallel_size == 1:
        from worker_svc.model_runner import ModelRunner

        return ModelRunner(model_config, cache_config, scheduler_config,
                           eos_token_id=eos_token_id)
    return TensorParallelRunner(model_config, cache_config, scheduler_config, eos_token_id,
                                on_rank_lost)


def rank_device(model_config: ModelConfig, rank: int) -> str:
    """The device rank ``rank`` runs on: ``cuda:<rank>`` on CUDA, else the CPU.

    Raises:
        ValueError: a device that names one GPU, or fewer GPUs than ranks.
    """
    size = model_config.tensor_parallel_size
    device = resolve_device(model_config.device)
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda" or device.index is not None:
        raise ValueError(f"device must be auto, cuda or cpu with tensor_parallel_size={size} "
                         f"(rank r runs on cuda:r), got {model_config.device!r}.")
    if torch.cuda.device_count() < size:
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs; "
                         f"{torch.cuda.device_count()} visible.")
    return f"cuda:{rank}"


def check_tensor_parallel_config(model_config: ModelConfig) -> None:
    """Refuse, before any process starts, a ``tensor_parallel_size`` the model or the host
    cannot serve: heads, KV heads or MLP width that do not split, an architecture not
    sharded yet, a device naming one GPU, fewer GPUs than ranks (``gridllm up`` runs this
    before it starts any service).

    Raises:
        ValueError: naming ``tensor_parallel_size`` (or ``device``).
    """
    if model_config.tensor_parallel_size == 1:
        return
    _check_shardable(model_config)
    rank_device(model_config, 0)


def _check_shardable(model_config: ModelConfig) -> None:
    """Refuse a model that cannot be split before any process starts (HF directories and
    random presets; a GGUF file is checked when every rank loads it)."""
    from gridllm.common.random_presets import random_model_config
    from worker_svc.loader import resolve_model_path
    from worker_svc.models import get_model_class
    from worker_svc.parallel.sharding import check_tensor_parallel

    path = resolve_model_path(model_config.model)
    if path.startswith("random:"):
        hf_config = random_model_config(path)
    elif os.path.isfile(os.path.join(path, "config.json")):
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(path)
    else:
        return
    architecture = (getattr(hf_config, "architectures", None) or [None])[0]
    check_tensor_parallel(hf_config, architecture, get_model_class(architecture),
                          model_config.tensor_parallel_size)


class TensorParallelRunner:
    """Rank 0 of a tensor-parallel group, with the ModelRunner interface the engine and the
    worker service drive (attributes not defined here are rank 0's ModelRunner's).

    Args:
        model_config, cache_config, scheduler_config, eos_token_id: as for ModelRunner.
        on_rank_lost: see ``build_runner``.
    Raises:
        ValueError: the model cannot be split ``tensor_parallel_size`` ways (or any error
            building the runner raises).
        RuntimeError: a follower failed to start (its traceback in the message).
    """

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, eos_token_id: int | None = None,
                 on_rank_lost: Callable[[str], None] | None = None):
        from worker_svc.model_runner import ModelRunner

        disable_nvlink_multicast()
        size = model_config.tensor_parallel_size
        if is_tensor_parallel_process():
            raise RuntimeError("this process already runs a tensor-parallel engine: shut it "
                               "down first (LLM.shutdown()).")
        check_tensor_parallel_config(model_config)
        if model_config.seed is None:
            # Every rank samples: unseeded requests must draw the same keys on each.
            model_config = dataclasses.replace(model_config, seed=random.getrandbits(31))
        self.tensor_parallel_size = size
        self._ranks = _Ranks(model_config, cache_config, scheduler_config, eos_token_id,
                             on_rank_lost)
        # Followers stop and the group is left when this runner is collected unstopped.
        self._finalizer = weakref.finalize(self, self._ranks.stop)
        try:
            self._ranks.start()
            device = rank_device(model_config, 0)
            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device))
            else:
                # The ranks share the host's cores (restored by shutdown).
                self._ranks.num_threads = torch.get_num_threads()
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
            rank_config = dataclasses.replace(model_config, device=device)
            self.runner = ModelRunner(rank_config, cache_config, scheduler_config,
                                      eos_token_id=eos_token_id)
        except BaseException as exc:
            failure = self._ranks.failure()
            self.shutdown()
            if failure and not isinstance(exc, ValueError):
                raise RuntimeError(failure) from exc
            raise
        self._ranks.is_serving = True
        logger.info("tensor-parallel group of %d ranks ready (%d KV blocks each)", size,
                    self.runner.num_kv_blocks)

    def __getattr__(self, name: str) -> Any:
        if name == "runner":  # not built (yet): no attribute to hand on
            raise AttributeError(name)
        return getattr(self.runner, name)

    @property
    def eos_token_id(self) -> int | None:
        return self.runner.eos_token_id

    @eos_token_id.setter
    def eos_token_id(self, value: int | None) -> None:
        self._ranks.send(("eos", value))
        self.runner.eos_token_id = value

    @property
    def follower_pids(self) -> list[int]:
        """Process ids of ranks 1 .. T-1."""
        return [p.pid for p in self._ranks.processes if p.pid is not None]

    def execute_model_async(self, scheduler_output):
        """ModelRunner.execute_model_async on every rank; returns rank 0's output.

        An Exception that every rank raised (a bad step) leaves the group in step; one that
        rank 0 alone raised, or one raised because a follower was lost, stops the group and
        raises RuntimeError saying what happened. Anything else (KeyboardInterrupt) may have
        left rank 0 between two collectives, so the group is stopped. Later calls raise once
        the group is stopped.
        """
        # The rows rank 0 holds going into the step: a follower holding others has diverged.
        rows = rows_digest(self.runner.input_batch.req_ids)
        step_number = self._ranks.send_step(scheduler_output, rows)
        try:
            output = self.runner.execute_model_async(scheduler_output)
        except Exception as exc:
            # A collective that failed because a follower died or was stopped (gloo:
            # "connection reset") says what followed; the monitor says what happened.
            lost = self._ranks.end_step(step_number, exc)
            if lost is not None:
                raise RuntimeError(lost) from exc
            raise
        except BaseException as exc:
            self._ranks.stop(f"interrupted in the middle of a step ({type(exc).__name__})")
            raise
        self._ranks.end_step(step_number)
        return output

    def execute_model(self, scheduler_output):
        return self.execute_model_async(scheduler_output).get_output()

    def reset_requests(self) -> None:
        self._ranks.send(("reset",))
        self.runner.reset_requests()

    def shutdown(self) -> None:
        """Stop the followers and leave the group (idempotent)."""
        self._finalizer()


class _Ranks:
    """The follower processes, their pipes and the monitor thread (no reference to the
    runner, so the runner can be collected)."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, eos_token_id: int | None,
                 on_rank_lost: Callable[[str], None] | None):
        self.configs = (model_config, cache_config, scheduler_config)
        self.eos_token_id = eos_token_id
        self.on_rank_lost = on_rank_lost
        self.size = model_config.tensor_parallel_size
        self.processes: list[Any] = []
        self.steps: list[Connection] = []
        self.statuses: list[Connection] = []
        # The followers' reports of steps that raised (read by the monitor).
        self.reports: list[Connection] = []
        self.alive: list[Connection] = []
        self.is_serving = False
        # True once this process joined the group (so stop leaves it).
        self.has_joined = False
        # Rank 0's torch threads before a CPU group took its share (restored on stop).
        self.num_threads: int | None = None
        self._is_stopping = threading.Event()
        # Set once a follower was lost (what happened); every later call raises it.
        self.lost: str | None = None
        # Set by the monitor once it has named the lost rank (``lost``).
        self._cause_known = threading.Event()
        self._monitor: threading.Thread | None = None
        # The number of the last step sent, and of the last one rank 0 finished.
        self.num_steps_sent = 0
        self._last_finished_step = 0
        # Guards the step outcomes below and ``lost``; notified when they change.
        self._outcomes = threading.Condition()
        # Numbers of rank 0's latest steps that raised.
        self._failed_steps: deque[int] = deque(maxlen=_MAX_FAILED_STEPS)
        # Per step number, the follower ranks that reported it raised.
        self._reported_failures: dict[int, set[int]] = {}

    def start(self) -> None:
        model_config, cache_config, scheduler_config = self.configs
        backend = "nccl" if rank_device(model_config, 0).startswith("cuda") else "gloo"
        store = torch.distributed.TCPStore("127.0.0.1", 0, self.size, is_master=True,
                                           wait_for_workers=False)
        context = multiprocessing.get_context("forkserver")
        # The forkserver imports torch and the runner once; each follower is a fork of it.
        context.set_forkserver_preload(["worker_svc.ranks.forkserver_preload"])
        extra = _extra_processors()
        log_env = {k: os.environ[k] for k in _LOG_ENV if k in os.environ}
        for rank in range(1, self.size):
            args = FollowerArgs(rank, self.size, store.port, backend,
                                dataclasses.replace(model_config,
                                                    device=rank_device(model_config, rank)),
                                cache_config, scheduler_config, self.eos_token_id, extra,
                                log_env)
            steps_recv, steps_send = context.Pipe(duplex=False)
            status_recv, status_send = context.Pipe(duplex=False)
            reports_recv, reports_send = context.Pipe(duplex=False)
            alive_recv, alive_send = context.Pipe(duplex=False)
            process = context.Process(target=run_follower, name=f"gridllm-tp-rank{rank}",
                                      args=(args, steps_recv, status_send, reports_send,
                                            alive_recv),
                                      daemon=True)
            process.start()
            for child_end in (steps_recv, status_send, reports_send, alive_recv):
                child_end.close()
            self.processes.append(process)
            self.steps.append(steps_send)
            self.statuses.append(status_recv)
            self.reports.append(reports_recv)
            self.alive.append(alive_send)
            logger.info("tensor-parallel rank %d of %d: pid %d", rank, self.size, process.pid)
        self._wait_until_up()
        self._monitor = threading.Thread(target=self._watch, daemon=True,
                                         name="tp-rank-monitor")
        self._monitor.start()
        init_tensor_parallel(0, self.size, backend, store)
        self.has_joined = True

    def _wait_until_up(self) -> None:
        """Block until every follower reached the store (raise if one died first)."""
        pending = dict(zip(self.statuses, self.processes, strict=True))
        sentinels = {p.sentinel: p for p in self.processes}
        while pending:
            ready = wait([*pending, *sentinels], timeout=START_TIMEOUT_S)
            if not ready:
                raise RuntimeError(f"tensor-parallel followers did not start within "
                                   f"{START_TIMEOUT_S:.0f}s.")
            for item in ready:
                if item in sentinels:
                    raise RuntimeError(self.failure() or _describe(sentinels[item]))
                message = _receive(item)
                if message is None or message[0] != "up":
                    raise RuntimeError(self.failure() or _describe(pending[item]))
                del pending[item]

    def _watch(self) -> None:
        """Stop the group when a follower exits, or reports a step that raised on it but
        not on rank 0 (rank 0 may record its own failure of that step a moment later, or
        wait in a collective the follower never reaches: the report waits for rank 0 to
        finish the step, at most ``_STEP_FAILURE_GRACE_S``)."""
        sentinels = {p.sentinel: p for p in self.processes}
        reports = {conn: rank for rank, conn in enumerate(self.reports, start=1)}
        # (rank, step number, traceback, deadline) of reports rank 0 has not matched yet.
        pending: list[tuple[int, int, str, float]] = []
        while not self._is_stopping.is_set():
            try:
                ready = wait([*sentinels, *reports], _POLL_S if pending else None)
            except (OSError, ValueError):  # stop() closed the pipes meanwhile
                return
            if self._is_stopping.is_set():
                return
            # Reports first: a follower that diverged after its report may exit next.
            for conn in [c for c in ready if c in reports]:
                message = _receive(conn)
                if message is None:  # the follower is exiting: its sentinel says more
                    del reports[conn]
                    continue
                _, step_number, text = message
                rank = reports[conn]
                with self._outcomes:
                    self._reported_failures.setdefault(step_number, set()).add(rank)
                    self._outcomes.notify_all()
                pending.append((rank, step_number, text,
                                time.monotonic() + _STEP_FAILURE_GRACE_S))
            for rank, step_number, text, deadline in list(pending):
                shared = self._rank0_failed(step_number)
                if shared is None and time.monotonic() < deadline:
                    continue
                if not shared:
                    self._declare_lost(f"tensor-parallel rank {rank}'s step failed while "
                                       f"rank 0's did not: {_last_line(text)}")
                    return
                pending.remove((rank, step_number, text, deadline))
            exited = [sentinels[s] for s in ready if s in sentinels]
            if exited:
                self._name_exited(exited)
                return

    def _name_exited(self, exited: list[Any]) -> None:
        # A rank killed by a signal takes the others down with it (their collectives fail
        # and they exit with an error): of the ranks gone within a moment, name the one a
        # signal ended, so the report says what happened rather than what followed.
        time.sleep(_CAUSE_GRACE_S)
        if self._is_stopping.is_set():
            return
        gone = exited + [p for p in self.processes if p.exitcode is not None]
        dead = next((p for p in gone if (p.exitcode or 0) < 0), gone[0])
        rank = self.processes.index(dead) + 1
        self._declare_lost(f"tensor-parallel rank {rank} (pid {dead.pid}) exited with code "
                           f"{dead.exitcode}: the engine's ranks are stopped")

    def _declare_lost(self, what: str) -> None:
        """Stop the group for good: ``what`` is what every later call raises."""
        with self._outcomes:
            if self.lost is not None or self._is_stopping.is_set():
                return
            self.lost = what
            self._outcomes.notify_all()
        self._cause_known.set()
        logger.error("%s", what)
        self._kill_all()
        abort_tensor_parallel()
        if self.on_rank_lost is not None and self.is_serving:
            self.on_rank_lost(what)

    def _rank0_failed(self, step_number: int) -> bool | None:
        """Whether rank 0's step ``step_number`` raised; None while rank 0 still runs it."""
        with self._outcomes:
            if step_number in self._failed_steps:
                return True
            if self._last_finished_step >= step_number:
                return False
            return None

    def failure(self) -> str | None:
        """A follower's startup error (its traceback), or how it was lost, if any."""
        for status in self.statuses:
            message = _receive(status, block=False)
            if message is not None and message[0] == "error":
                return f"a tensor-parallel follower failed to start:\n{message[1]}"
        return self.lost

    def send_step(self, scheduler_output: Any, rows: int) -> int:
        """Send every follower the next step; returns its number (see ``send``)."""
        self.num_steps_sent += 1
        self.send(("step", scheduler_output, rows, self.num_steps_sent))
        return self.num_steps_sent

    def end_step(self, step_number: int, error: Exception | None = None) -> str | None:
        """Record that rank 0 finished step ``step_number``, and whether it raised.

        Returns:
            With ``error``: None if every follower reported the same step raised (a bad
            step: the group is in step), else why the engine is lost (stopped now if it
            was not yet: a follower did not raise within ``_STEP_FAILURE_GRACE_S``).
        """
        with self._outcomes:
            if error is not None:
                self._failed_steps.append(step_number)
            self._last_finished_step = step_number
        if error is None:
            return None
        lost = self.lost_cause()
        if lost is not None:
            return lost
        deadline = time.monotonic() + _STEP_FAILURE_GRACE_S
        with self._outcomes:
            while True:
                reported = self._reported_failures.get(step_number, set())
                missing = [r for r in range(1, self.size) if r not in reported]
                left = deadline - time.monotonic()
                if not missing or self.lost or self._is_stopping.is_set() or left <= 0:
                    break
                self._outcomes.wait(left)
            self._reported_failures.pop(step_number, None)
        if missing and self.lost is None:
            ranks = ", ".join(map(str, missing))
            self._declare_lost(f"tensor-parallel rank 0's step failed while rank {ranks}'s "
                               f"did not: {_last_line(_describe_error(error))}")
        return self.lost

    def send(self, message: tuple) -> None:
        """Write ``message`` to every follower (pickled once).

        Raises:
            RuntimeError: a follower was lost (the engine cannot run).
        """
        if self.lost:
            raise RuntimeError(self.lost)
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.steps:
                conn.send_bytes(data)
        except OSError as exc:
            raise RuntimeError(self.lost_cause() or f"a tensor-parallel follower is gone: "
                               f"{exc}") from exc

    def lost_cause(self) -> str | None:
        """How a follower was lost, if one was or has exited: the monitor names the rank
        within its grace period, so an error seen before that (a broken pipe, a failed
        collective, once every rank is gone) waits for it (at most ``_CAUSE_GRACE_S +
        _CAUSE_MARGIN_S``)."""
        if self.lost is None and not any(_exited(p) for p in self.processes):
            return None
        self._cause_known.wait(_CAUSE_GRACE_S + _CAUSE_MARGIN_S)
        return self.lost

    def _kill_all(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(STOP_TIMEOUT_S)

    def stop(self, reason: str | None = None) -> None:
        """Ask the followers to exit, kill those that do not, leave the group.

        Args:
            reason: why, if the engine is broken (later calls raise RuntimeError with it).
        """
        self._is_stopping.set()
        self._cause_known.set()  # no monitor report is coming: a failed write need not wait
        with self._outcomes:
            self._outcomes.notify_all()
        if reason is not None and not self.lost:
            self.lost = f"the tensor-parallel engine was stopped: {reason}"
            self._kill_all()
        if not self.lost:
            try:
                self.send(("stop",))
            except RuntimeError:
                pass
        for process in self.processes:
            process.join(STOP_TIMEOUT_S)
        self._kill_all()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(STOP_TIMEOUT_S)
        for conn in (*self.steps, *self.statuses, *self.reports, *self.alive):
            conn.close()
        if self.has_joined:
            destroy_tensor_parallel()
            self.has_joined = False
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
            self.num_threads = None


def _receive(conn: Connection, block: bool = True) -> tuple | None:
    try:
        if not block and not conn.poll():
            return None
        return conn.recv()
    except (EOFError, OSError):
        return None


def _describe_error(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error))


def _last_line(text: str) -> str:
    """The last line of a traceback: the exception's type and message."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no message)"


def _describe(process) -> str:
    process.join(1.0)
    return (f"tensor-parallel follower {process.name} (pid {process.pid}) exited with code "
            f"{process.exitcode} before joining the group")


def _extra_processors() -> list[tuple[str, Any, Any]]:
    """The registered logits processors that can travel to a follower (by reference)."""
    from worker_svc.logits_processors import get_logits_processor, registered_logits_processors

    extra = []
    for name in registered_logits_processors():
        spec = get_logits_processor(name)
        try:
            pickle.dumps((spec.fn, spec.verify))
        except Exception:  # noqa: BLE001 - pickling can raise anything
            logger.warning("logits processor %r cannot reach the tensor-parallel followers "
                           "(not an importable module-level function): requests naming it "
                           "will fail", name)
            continue
        extra.append((name, spec.fn, spec.verify))
    return extra
