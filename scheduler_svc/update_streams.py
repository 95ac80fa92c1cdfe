"""Where the step loop's request updates go: each request's Submit queue or Session outbox."""

from __future__ import annotations

import asyncio
from typing import Protocol

from gridllm.common.contract import RequestUpdate

# One request's update and the id of the worker that produced it.
Delivery = tuple[RequestUpdate, str]


class UpdateSink(Protocol):
    """Takes a request's updates: an ``asyncio.Queue`` (a Submit stream) or a
    ``SessionOutbox`` (a Session stream, shared by its requests)."""

    def put_nowait(self, delivery: Delivery) -> None: ...


class UpdateStreams:
    """The sink each in-flight request's updates go to, and the tenant that submitted it."""

    def __init__(self) -> None:
        self._sinks: dict[str, UpdateSink] = {}
        self._tenants: dict[str, str] = {}

    def open(self, req_id: str, tenant: str = "") -> asyncio.Queue[Delivery]:
        """A queue of its own for a Submit stream's request."""
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self.attach(req_id, tenant, queue)
        return queue

    def attach(self, req_id: str, tenant: str, sink: UpdateSink) -> None:
        self._sinks[req_id] = sink
        self._tenants[req_id] = tenant

    def close(self, req_id: str) -> None:
        self._sinks.pop(req_id, None)
        self._tenants.pop(req_id, None)

    def owned_by(self, req_ids: list[str], tenant: str) -> list[str]:
        """Those of ``req_ids`` in flight for ``tenant`` (the others are not its to touch)."""
        return [r for r in req_ids if r in self._sinks and self._tenants[r] == tenant]

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._sinks

    def __len__(self) -> int:
        return len(self._sinks)

    def deliver(self, updates: list[RequestUpdate], worker_id: str = "") -> None:
        """Hand one step's updates to their sinks; a session's writer wakes once for all
        of its requests (its outbox only sets an event)."""
        sinks = self._sinks
        for update in updates:
            sink = sinks.get(update.req_id)
            if sink is not None:
                sink.put_nowait((update, worker_id))


def merge_updates(first: RequestUpdate, second: RequestUpdate) -> RequestUpdate:
    """Two consecutive updates of one request as one."""
    def join(a, b):
        return None if a is None and b is None else (a or []) + (b or [])

    return RequestUpdate(
        first.req_id, first.new_token_ids + second.new_token_ids,
        join(first.new_logprobs, second.new_logprobs),
        join(first.new_prompt_logprobs, second.new_prompt_logprobs),
        second.finish_reason, second.stop_reason, second.num_cached_tokens, second.error,
        second.error_kind)
