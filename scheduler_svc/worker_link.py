"""One worker as the scheduler service sees it: a scheduler core (one KV pool, since each
worker has its own KV memory), a persistent bidirectional Step stream and the step loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from gridllm.common.block_versions import bump_versions
from gridllm.common.contract import RequestUpdate, SchedulerOutput
from gridllm.common.convert import runner_output_from_pb, scheduler_output_to_pb
from gridllm.v1 import worker_pb2, worker_pb2_grpc
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.step_pipeline import StepPipeline

logger = logging.getLogger(__name__)

# How often a pending step answer checks that its worker is still heartbeating.
_WATCHDOG_INTERVAL_S = 0.5

# Called after every step with the step's output and the updates it produced.
StepCallback = Callable[["WorkerLink", SchedulerOutput, list[RequestUpdate]], None]


class WorkerLinkError(ConnectionError):
    """The Step stream broke or the worker refused it."""


class WorkerLink:
    """Drives one worker.

    Args:
        info: the worker's WorkerInfo (from GetInfo).
        channel: an open channel to the worker.
        scheduler: the core that owns this worker's KV pool; may be set after open()
            (it is rebuilt from the block versions the handshake returns).
        on_step: receives every step's updates (to stream them and mirror block state).
        on_dead: called once when the stream breaks, with the requests that were unfinished
            (taken out of this link's core, ready to resume on another worker).
        max_steps_in_flight: 2 pipelines the steps (N+1 is sent while N runs; a request
            that finishes at N costs one wasted slot at N+1); 1 waits for each answer.
        lost_after_s: a worker missing from the registry this long while a step is
            outstanding is taken for lost (hung: its stream can stay open for ever).
    """

    def __init__(self, info: worker_pb2.WorkerInfo, channel: grpc.aio.Channel,
                 scheduler: Scheduler | None, on_step: StepCallback,
                 on_dead: Callable[[WorkerLink, list[Request]], None],
                 max_steps_in_flight: int = 2, lost_after_s: float = 6.0):
        if max_steps_in_flight not in (1, 2):
            raise ValueError(f"max_steps_in_flight must be 1 or 2, got {max_steps_in_flight}.")
        self.max_steps_in_flight = max_steps_in_flight
        self.info = info
        self.worker_id = info.worker_id
        self.channel = channel
        self._scheduler = scheduler
        self._on_step = on_step
        self._on_dead = on_dead
        self._call: grpc.aio.StreamStreamCall | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.step_id = 0
        self.is_alive = False
        # Per KV block: times handed out for new content, in step with the worker's count.
        self.block_versions: list[int] = [0] * info.num_kv_blocks
        # Set once the worker said it shuts down: no new requests go to it.
        self.is_draining = False
        self.lost_after_s = lost_after_s
        # When the worker went missing from the registry (None: listed).
        self._unlisted_since: float | None = None
        # A read posted while idle, so a closed stream or a drain notice is seen at once.
        self._pending_read: asyncio.Future | None = None
        # The step whose answer on_step gets: when it was sent (time.monotonic()) and the
        # seconds the worker says it ran (for the metrics).
        self.last_step_sent_at: float | None = None
        # step id -> when it was sent (for the round-trip metric).
        self._sent_at: dict[int, float] = {}
        self.last_step_execute_s = 0.0

    async def open(self, timeout: float = 10.0) -> None:
        """Open the Step stream and check it with an empty step.

        Raises:
            WorkerLinkError: the worker refused (another scheduler drives it) or is gone.
        """
        stub = worker_pb2_grpc.WorkerStub(self.channel)
        self._call = stub.Step()
        try:
            await self._call.write(worker_pb2.StepRequest(step_id=0))
            handshake = await asyncio.wait_for(self._read_response(0), timeout)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError, WorkerLinkError) as exc:
            self._call.cancel()
            raise WorkerLinkError(f"worker {self.worker_id} at {self.info.address}: "
                                  f"{_describe(exc)}") from exc
        if self.is_draining:
            self._call.cancel()
            raise WorkerLinkError(f"worker {self.worker_id} is shutting down")
        if len(handshake.block_versions) == self.info.num_kv_blocks:
            self.block_versions = list(handshake.block_versions)
        self.is_alive = True

    @property
    def is_listed(self) -> bool:
        """False while the worker is missing from the registry: no new requests go to it."""
        return self._unlisted_since is None

    @is_listed.setter
    def is_listed(self, is_listed: bool) -> None:
        if is_listed:
            self._unlisted_since = None
        elif self._unlisted_since is None:
            self._unlisted_since = time.monotonic()

    def _is_unresponsive(self) -> bool:
        # A draining worker leaves the registry on purpose and finishes its requests.
        return (self._unlisted_since is not None and not self.is_draining
                and time.monotonic() - self._unlisted_since > self.lost_after_s)

    async def _read_response(self, step_id: int) -> worker_pb2.StepResponse:
        """The answer to ``step_id``, noting drain notices on the way.

        Raises:
            WorkerLinkError: the stream ended, or the worker stopped heartbeating while the
                answer was awaited (a hung process).
        """
        assert self._call is not None
        while True:
            read, self._pending_read = self._pending_read, None
            if read is None:
                read = asyncio.ensure_future(self._call.read())
            while not read.done():
                await asyncio.wait({read}, timeout=_WATCHDOG_INTERVAL_S)
                if not read.done() and self._is_unresponsive():
                    read.cancel()
                    raise WorkerLinkError(f"worker {self.worker_id} missed its heartbeats "
                                          f"for {self.lost_after_s:.1f}s with a step pending")
            response = read.result()
            if response is grpc.aio.EOF:
                raise WorkerLinkError(f"worker {self.worker_id} closed the Step stream")
            if response.is_draining and not self.is_draining:
                logger.info("worker %s is draining", self.worker_id)
                self.is_draining = True
            if response.step_id == step_id:
                return response
            if response.step_id != 0:
                raise WorkerLinkError(f"worker {self.worker_id} answered step "
                                      f"{response.step_id} to step {step_id}")

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError(f"worker link {self.worker_id} has no scheduler core yet")
        return self._scheduler

    @scheduler.setter
    def scheduler(self, core: Scheduler) -> None:
        self._scheduler = core

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"step-loop-{self.worker_id}")

    # ----------------------------------------------------------------- requests
    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)
        self._wakeup.set()

    def abort(self, req_ids: list[str],
              status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> list[str]:
        aborted = self.scheduler.abort_requests(req_ids, status)
        if aborted:
            self._wakeup.set()  # the worker must drop their state
        return aborted

    def has_request(self, req_id: str) -> bool:
        return req_id in self.scheduler.requests

    # ----------------------------------------------------------------- step loop
    async def _run(self) -> None:
        # With two steps in flight the worker starts step N+1 (feeding its own samples) while
        # this loop applies step N's answer; each step's handle is its step id.
        pipeline = StepPipeline(self.scheduler, self.max_steps_in_flight)
        try:
            while True:
                if (not pipeline.num_in_flight and self.is_draining
                        and not self.scheduler.has_unfinished_requests()):
                    await self._close_drained()
                    break
                step = pipeline.schedule_next()
                if step is not None:
                    self.step_id += 1
                    assert self._call is not None
                    bump_versions(self.block_versions, step.output, self.scheduler.block_size)
                    step.handle = self.step_id
                    self._sent_at[self.step_id] = time.monotonic()
                    await self._call.write(scheduler_output_to_pb(step.output, self.step_id))
                    continue
                if not pipeline.num_in_flight:
                    await self._wait_idle()
                    continue
                step_id = pipeline.oldest().handle
                response = await self._read_response(step_id)
                self.last_step_sent_at = self._sent_at.pop(step_id, None)
                self.last_step_execute_s = response.execute_seconds
                output, updates = pipeline.complete(runner_output_from_pb(response))
                self._on_step(self, output, updates)
        except asyncio.CancelledError:
            raise
        except (grpc.aio.AioRpcError, WorkerLinkError) as exc:
            logger.warning("worker %s lost: %s", self.worker_id, _describe(exc))
        except Exception:
            logger.exception("step loop of worker %s failed", self.worker_id)
        self._fail_all()

    async def _wait_idle(self) -> None:
        """Sleep until a request arrives or is aborted, or the worker speaks up."""
        assert self._call is not None
        self._wakeup.clear()
        if self._pending_read is None:
            self._pending_read = asyncio.ensure_future(self._call.read())
        wakeup = asyncio.ensure_future(self._wakeup.wait())
        try:
            await asyncio.wait({self._pending_read, wakeup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wakeup.cancel()
        if self._pending_read.done():
            # Between steps the worker only sends a drain notice, or ends the stream.
            await self._read_response(0)

    async def _close_drained(self) -> None:
        assert self._call is not None
        logger.info("worker %s drained; closing its stream", self.worker_id)
        await self._call.done_writing()
        try:
            await asyncio.wait_for(self._read_response(-1), 5.0)
        except (WorkerLinkError, grpc.aio.AioRpcError, asyncio.TimeoutError):
            pass

    def _fail_all(self) -> None:
        self.is_alive = False
        if self._pending_read is not None:
            self._pending_read.cancel()
            self._pending_read = None
        if self._call is not None:
            self._call.cancel()
        # The requests this worker was running go back to the pool, to resume elsewhere.
        orphans = [] if self._scheduler is None else self.scheduler.take_unfinished()
        self._on_dead(self, orphans)

    async def close(self) -> None:
        """Stop the step loop and the stream (in-flight requests go to ``on_dead``)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._fail_all()
        elif self._task is None and self.is_alive:
            self._fail_all()
        if self._call is not None:
            self._call.cancel()
        await self.channel.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
