"""One Session stream: many requests over one call, one message per step for all of them.

The router opens one Session per scheduler instead of one Submit call per request: with a
few hundred requests running, per-request calls cost a gRPC write and a coroutine wake-up
per request per step in both processes. Here the step loop's ``deliver`` drops each update
into its session's ``SessionOutbox`` (merged per request while the writer is behind) and
wakes the writer once; the writer sends everything pending as one ``SessionResponse``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from gridllm.common import tracing
from gridllm.common.contract import ErrorKind, RequestUpdate
from gridllm.common.convert import request_update_to_pb
from gridllm.common.logger import request_id_var
from gridllm.v1 import scheduler_pb2
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.update_streams import Delivery, UpdateStreams, merge_updates
from scheduler_svc.worker_pool import NoWorkerError, WorkerPool

logger = logging.getLogger(__name__)

# A message of updates past this size is split: many requests with prompt logprobs at once
# must not reach the channel's message size limit.
_MAX_MESSAGE_BYTES = 4 << 20


class SessionHost(Protocol):
    """What a session needs of the servicer: Submit's checks and admission, the pool, and
    the update streams."""

    pool: WorkerPool
    streams: UpdateStreams
    retry_after_ms: int

    def is_draining(self) -> bool: ...

    def make_request(self, msg: scheduler_pb2.SubmitRequest) -> Request: ...

    def admission_refusal(self, req: Request) -> str | None: ...


class SessionOutbox:
    """What a session has yet to send: the latest (merged) update of each request, and the
    requests that failed. ``put_nowait`` is what ``UpdateStreams.deliver`` calls."""

    def __init__(self) -> None:
        self.pending: dict[str, Delivery] = {}
        self.errors: list[scheduler_pb2.SessionError] = []
        # Set when there is something to send (or the session should look at its state).
        self.wakeup = asyncio.Event()

    def put_nowait(self, delivery: Delivery) -> None:
        update, worker_id = delivery
        earlier = self.pending.get(update.req_id)
        # The writer fell behind the step loop: one update for all the steps it missed.
        self.pending[update.req_id] = (delivery if earlier is None
                                       else (merge_updates(earlier[0], update), worker_id))
        self.wakeup.set()

    def fail(self, req_id: str, code: grpc.StatusCode, message: str,
             retry_after_ms: int | None = None) -> None:
        error = scheduler_pb2.SessionError(request_id=req_id, code=code.name, message=message)
        if retry_after_ms is not None:
            error.retry_after_ms = retry_after_ms
        self.errors.append(error)
        self.wakeup.set()

    def discard(self, req_id: str) -> None:
        self.pending.pop(req_id, None)


@dataclass
class _SessionRequest:
    """A request of the session in flight: what its end is logged with."""

    req: Request
    tenant: str
    client_request_id: str
    span: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    num_output_tokens: int = 0
    worker_id: str = ""


class ClientSession:
    """The scheduler's side of one Session stream.

    Args:
        servicer: checks and admits the submits, owns the pool and the update streams.
    """

    def __init__(self, servicer: SessionHost):
        self.servicer = servicer
        self.outbox = SessionOutbox()
        self.requests: dict[str, _SessionRequest] = {}
        self.is_reading = True

    # ----------------------------------------------------------------- up: requests
    async def read(self, request_iterator: AsyncIterator[scheduler_pb2.SessionRequest]) -> None:
        """Handle submits and aborts until the client half-closes (or the call ends)."""
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "submit":
                    self.submit(message.submit)
                elif kind == "abort":
                    self.abort(message.abort)
                else:
                    self.outbox.fail("", grpc.StatusCode.INVALID_ARGUMENT,
                                     "kind must be set: submit or abort (an unknown or empty "
                                     "SessionRequest).")
        finally:
            self.is_reading = False
            self.outbox.wakeup.set()

    def submit(self, message: scheduler_pb2.SessionSubmit) -> None:
        request = message.request
        req_id = request.request_id
        token = request_id_var.set(message.client_request_id or req_id or None)
        try:
            self._submit(message, req_id)
        finally:
            request_id_var.reset(token)

    def _submit(self, message: scheduler_pb2.SessionSubmit, req_id: str) -> None:
        servicer, outbox = self.servicer, self.outbox
        if not message.HasField("request"):
            outbox.fail(req_id, grpc.StatusCode.INVALID_ARGUMENT, "submit.request must be set.")
            return
        if servicer.is_draining():
            outbox.fail(req_id, grpc.StatusCode.UNAVAILABLE, "the scheduler is shutting down")
            return
        try:
            req = servicer.make_request(message.request)
        except NoWorkerError as exc:
            outbox.fail(req_id, grpc.StatusCode.UNAVAILABLE, str(exc))
            return
        except ValueError as exc:
            outbox.fail(req_id, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        refusal = servicer.admission_refusal(req)
        if refusal is not None:
            logger.info("request %s refused: %s", req_id, refusal)
            outbox.fail(req_id, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal,
                        servicer.retry_after_ms)
            return
        entry = _SessionRequest(req, message.tenant, message.client_request_id)
        entry.span.enter_context(tracing.span("scheduler.submit", req_id,
                                              tuple(message.trace_context.items())))
        servicer.streams.attach(req_id, message.tenant, outbox)
        self.requests[req_id] = entry
        try:
            servicer.pool.add_request(req)
        except (NoWorkerError, ValueError) as exc:
            code = (grpc.StatusCode.UNAVAILABLE if isinstance(exc, NoWorkerError)
                    else grpc.StatusCode.INVALID_ARGUMENT)
            self._end(req_id, None)
            outbox.fail(req_id, code, str(exc))

    def abort(self, message: scheduler_pb2.SessionAbort) -> None:
        req_ids = [r for r in message.request_ids
                   if r in self.requests and self.requests[r].tenant == message.tenant]
        if not req_ids:
            return
        status = (RequestStatus.FINISHED_STOPPED
                  if message.reason == scheduler_pb2.ABORT_REASON_STOP
                  else RequestStatus.FINISHED_ABORTED)
        self.servicer.pool.abort(req_ids, status)
        for req_id in req_ids:
            self._end(req_id, "aborted")

    # ----------------------------------------------------------------- down: updates
    def has_output(self) -> bool:
        return bool(self.outbox.pending or self.outbox.errors)

    def take(self) -> list[scheduler_pb2.SessionResponse]:
        """Everything pending as messages (one, unless it is very large)."""
        outbox = self.outbox
        pending, outbox.pending = outbox.pending, {}
        errors, outbox.errors = outbox.errors, []
        messages = [scheduler_pb2.SessionResponse()]
        num_bytes = 0
        for req_id, (update, worker_id) in pending.items():
            entry = self.requests.get(req_id)
            if entry is None:  # aborted after this update was queued
                continue
            entry.worker_id = worker_id or entry.worker_id
            if update.error is not None:
                # As a Submit stream ends: the error alone, whatever tokens came with it.
                errors.append(scheduler_pb2.SessionError(
                    request_id=req_id, code=update_error_code(update).name,
                    message=update.error))
                self._end(req_id, "failed")
                continue
            entry.num_output_tokens += len(update.new_token_ids)
            if update.new_logprobs or update.new_prompt_logprobs:
                response = request_update_to_pb(update, worker_id)
                num_bytes += response.ByteSize()
                if num_bytes > _MAX_MESSAGE_BYTES and messages[-1].updates:
                    messages.append(scheduler_pb2.SessionResponse())
                    num_bytes = response.ByteSize()
                messages[-1].updates.append(response)
            else:  # token ids only: built in place
                request_update_to_pb(update, worker_id, into=messages[-1].updates.add())
            if update.finished:
                self._end(req_id, update.finish_reason.value if update.finish_reason else "")
        messages[-1].errors.extend(errors)
        return messages

    # ----------------------------------------------------------------- end
    def close(self) -> None:
        """The stream ended or broke: abort every unfinished request and free its blocks."""
        unfinished = list(self.requests)
        if unfinished:
            self.servicer.pool.abort(unfinished)
            logger.info("session closed with %d unfinished requests: aborted", len(unfinished))
        for req_id in unfinished:
            self._end(req_id, "cancelled")

    def _end(self, req_id: str, how: str | None) -> None:
        entry = self.requests.pop(req_id)
        self.servicer.streams.close(req_id)
        self.outbox.discard(req_id)
        entry.span.close()
        if how is not None:
            # Logged from the session's writer: the request's own id goes on the line.
            logger.info("request %s of tenant %s %s on worker %s: %d prompt + %d output "
                        "tokens", req_id, entry.tenant or "-", how, entry.worker_id or "-",
                        entry.req.num_prompt_tokens, entry.num_output_tokens,
                        extra={"request_id": entry.client_request_id or req_id})

    async def serve(self, request_iterator: AsyncIterator[scheduler_pb2.SessionRequest]
                    ) -> AsyncIterator[scheduler_pb2.SessionResponse]:
        """Run the session: read requests in a task, write updates here.

        Yields:
            One SessionResponse per delivery (more while behind, merged); returns once the
            client half-closed and nothing is in flight, or the scheduler drains and nothing
            is in flight.
        """
        reader = asyncio.create_task(self.read(request_iterator), name="session-reader")
        try:
            while True:
                self.outbox.wakeup.clear()
                if reader.done() and not reader.cancelled() and reader.exception():
                    raise reader.exception()  # type: ignore[misc]
                if self.has_output():
                    for message in self.take():
                        yield message
                    continue
                if not self.requests and (not self.is_reading or self.servicer.is_draining()):
                    return
                await self.outbox.wakeup.wait()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.close()


def update_error_code(update: RequestUpdate) -> grpc.StatusCode:
    """The status an update's error ends its request with (as Submit's status)."""
    return (grpc.StatusCode.UNAVAILABLE if update.error_kind == ErrorKind.UNAVAILABLE
            else grpc.StatusCode.INVALID_ARGUMENT)
