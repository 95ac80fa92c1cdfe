"""ASGI plumbing of the HTTP front: server-sent events, client disconnects, merged streams.

A client that goes away must abort its request at once (its KV blocks are freed), whether it
was streaming or waiting for a whole answer, and whether or not tokens are flowing: the
response races the request's work against the ``http.disconnect`` message and cancels the
work when the client is gone first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
DONE_EVENT = b"data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The HTTP client closed its connection before the answer was complete."""


def sse_event(payload: dict[str, Any]) -> bytes:
    """One ``data:`` event of a server-sent event stream."""
    return b"data: " + json.dumps(payload, ensure_ascii=False,
                                  separators=(",", ":")).encode() + b"\n\n"


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns once the client disconnected (the request body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(work: Awaitable[T], receive: Receive) -> T:
    """``work``'s result, or ClientDisconnected (``work`` cancelled) if the client leaves."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response whose body iterator is closed (aborting the request
    behind it) as soon as the client disconnects, even between two events."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        super().__init__(content, headers={"Cache-Control": "no-cache", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            async with contextlib.aclosing(self.body_iterator):  # type: ignore[type-var]
                await self.stream_response(send)

        try:
            await until_disconnect(stream(), receive)
        except (ClientDisconnected, OSError):
            pass


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several iterators as they come, with the position of their iterator; the
    first exception ends the merge (and cancels the rest)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(position: int, stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    await queue.put((position, item))
            await queue.put((position, done))
        except Exception as exc:  # noqa: BLE001 - re-raised below
            await queue.put((position, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            position, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
