"""The router's side of a Session stream: one per scheduler, demultiplexed per request.

A Submit call per request costs the scheduler and the router a gRPC message and a coroutine
wake-up per request per step. A ``SchedulerSession`` carries every request this router has
at one scheduler over one stream instead: one reader task takes each message (all of a
step's updates) and hands each update to its request's queue; each request reads its queue
through a ``SessionCall``, which looks to the request path exactly like a Submit call: an
async iterator of ``SubmitResponse`` that raises ``grpc.aio.AioRpcError`` (the per-request
error's status code, message and retry hint, or the session's own failure when the stream
breaks) and aborts the request upstream when cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from gridllm.common.grpc_utils import RETRY_AFTER_KEY
from gridllm.v1 import scheduler_pb2, scheduler_pb2_grpc

logger = logging.getLogger(__name__)

# What a request's queue holds: an update, or the error that ends it.
_Item = scheduler_pb2.SubmitResponse | grpc.aio.AioRpcError


class Inbox:
    """One request's updates, for its one reader: what the request path uses of an
    ``asyncio.Queue`` (``put_nowait``, ``get``, ``get_nowait``, ``empty``) without its
    per-item bookkeeping, since an item comes per request per step. Created on the loop
    that reads it."""

    __slots__ = ("_items", "_waiter", "_loop")

    def __init__(self) -> None:
        self._items: deque[_Item] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()

    def put_nowait(self, item: _Item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> _Item:
        """The oldest item; IndexError when there is none."""
        return self._items.popleft()

    async def get(self) -> _Item:
        while not self._items:
            self._waiter = self._loop.create_future()
            await self._waiter
        return self._items.popleft()


class _Queue(Protocol):
    """An ``Inbox`` or an ``asyncio.Queue``."""

    def put_nowait(self, item: _Item) -> None: ...

    def empty(self) -> bool: ...

    def get_nowait(self) -> _Item: ...

    async def get(self) -> _Item: ...


def rpc_error(code: grpc.StatusCode, details: str,
              retry_after_ms: int | None = None) -> grpc.aio.AioRpcError:
    """The error a Submit call would have raised (the retry hint in trailing metadata)."""
    trailing = (grpc.aio.Metadata() if retry_after_ms is None
                else grpc.aio.Metadata((RETRY_AFTER_KEY, str(retry_after_ms))))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


def _session_error(error: scheduler_pb2.SessionError) -> grpc.aio.AioRpcError:
    code = getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN)
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return rpc_error(code, error.message,
                     error.retry_after_ms if error.HasField("retry_after_ms") else None)


class SchedulerSession:
    """One Session stream to a scheduler and the queues of the requests riding it.

    Args:
        stub: the scheduler's stub.
        address: for the logs.
    """

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub, address: str = ""):
        self.address = address
        self._outgoing: asyncio.Queue[scheduler_pb2.SessionRequest | None] = asyncio.Queue()
        self._queues: dict[str, Inbox] = {}
        # Why the stream ended (None while it is up).
        self.error: grpc.aio.AioRpcError | None = None
        # Messages received: one per scheduler step (at most), for all the requests here.
        self.num_messages = 0
        self._call = stub.Session(self._requests())
        self._reader = asyncio.create_task(self._read(), name=f"session-{address}")

    @property
    def is_open(self) -> bool:
        return self.error is None

    @property
    def num_requests(self) -> int:
        return len(self._queues)

    async def _requests(self) -> AsyncIterator[scheduler_pb2.SessionRequest]:
        while True:
            message = await self._outgoing.get()
            if message is None:
                return
            yield message

    async def _read(self) -> None:
        error = rpc_error(grpc.StatusCode.UNAVAILABLE,
                          f"scheduler {self.address} ended the session")
        try:
            async for message in self._call:
                self.num_messages += 1
                queues = self._queues
                for update in message.updates:
                    queue = queues.get(update.request_id)
                    if queue is not None:
                        queue.put_nowait(update)
                for failure in message.errors:
                    queue = queues.pop(failure.request_id, None)
                    if queue is not None:
                        queue.put_nowait(_session_error(failure))
        except grpc.aio.AioRpcError as exc:
            # The stream broke: to each of its requests, as their Submit calls would have.
            error = exc
        except asyncio.CancelledError:
            error = rpc_error(grpc.StatusCode.CANCELLED, "the router closed the session")
        finally:
            self.error = error
            queues, self._queues = self._queues, {}
            for queue in queues.values():
                queue.put_nowait(error)
            if queues:
                logger.warning("session to scheduler %s ended (%s) with %d requests in flight",
                               self.address, error.code().name, len(queues))

    def submit(self, submit: scheduler_pb2.SessionSubmit,
               deadline: float | None = None) -> SessionCall:
        """Send a request and return its call (read it like a Submit call's stream)."""
        req_id = submit.request.request_id
        queue = Inbox()
        if self.error is not None:
            queue.put_nowait(self.error)
        else:
            self._queues[req_id] = queue
            self._outgoing.put_nowait(scheduler_pb2.SessionRequest(submit=submit))
        return SessionCall(self, req_id, submit.tenant, queue, deadline)

    def abort(self, req_id: str, tenant: str) -> None:
        """Stop a request upstream (frees its blocks); nothing more comes for it."""
        if self._queues.pop(req_id, None) is not None and self.error is None:
            self._outgoing.put_nowait(scheduler_pb2.SessionRequest(
                abort=scheduler_pb2.SessionAbort(request_ids=[req_id], tenant=tenant)))

    def forget(self, req_id: str) -> None:
        """A request that finished upstream."""
        self._queues.pop(req_id, None)

    async def close(self) -> None:
        """End the stream; the scheduler aborts the requests still in flight."""
        self._outgoing.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class SessionCall:
    """One request of a session, read like a Submit call: its updates in order, then
    StopAsyncIteration after the one with a finish reason, or the AioRpcError that ended
    it (DEADLINE_EXCEEDED once ``deadline``, a ``time.monotonic()`` time, has passed)."""

    def __init__(self, session: SchedulerSession, req_id: str, tenant: str,
                 queue: _Queue, deadline: float | None):
        self.session = session
        self.req_id = req_id
        self.tenant = tenant
        self._queue = queue
        self._is_done = False
        # An error taken from the queue while merging updates: raised by the next read.
        self._held: grpc.aio.AioRpcError | None = None
        # The deadline is one timer that queues DEADLINE_EXCEEDED behind the updates already
        # there (not a timeout around each read: reads come once per token).
        self._timer: asyncio.TimerHandle | None = None
        self._expired: grpc.aio.AioRpcError | None = None
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_later(
                max(deadline - time.monotonic(), 0.0), self._expire)

    def _expire(self) -> None:
        self._timer = None
        if not self._is_done:
            self._expired = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            self._queue.put_nowait(self._expired)

    def _fail(self, error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
        """The error to raise; one from upstream ends the call (nothing to abort there), the
        deadline's leaves it to ``cancel`` to abort the request upstream."""
        if error is not self._expired:
            self._end()
        return error

    def _end(self) -> None:
        self._is_done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __aiter__(self) -> SessionCall:
        return self

    async def __anext__(self) -> scheduler_pb2.SubmitResponse:
        if self._is_done:
            raise StopAsyncIteration
        if self._held is not None:
            held, self._held = self._held, None
            raise self._fail(held)
        queue = self._queue
        item = queue.get_nowait() if not queue.empty() else await queue.get()
        if isinstance(item, grpc.aio.AioRpcError):
            raise self._fail(item)
        # Updates queued while this request's reader was busy (its client reads slowly, or
        # the event loop is behind) go out as one: one delta and one client message, the
        # way the scheduler merges a session's steps when its writer falls behind.
        while not item.finish_reason and not queue.empty():
            later = queue.get_nowait()
            if isinstance(later, grpc.aio.AioRpcError):
                self._held = later
                break
            item.MergeFrom(later)
        if item.finish_reason:
            self._end()
            self.session.forget(self.req_id)
        return item

    def cancel(self) -> None:
        """Abort the request upstream unless it already ended."""
        if not self._is_done:
            self._end()
            self.session.abort(self.req_id, self.tenant)
