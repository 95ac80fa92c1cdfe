"""The router's answers for external KV-aware routers: SubscribeKvEvents and GetLoads.

Both read shared state only (the Redis event log, the schedulers' stats), so every router
behind one address answers alike: a subscription may replay on one router what another
served.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from gridllm.common.kv_events import decode, entry_id, sequence_of, to_pb
from gridllm.common.redis_keys import DEFAULT_KEYS, RedisKeys
from gridllm.v1 import generate_pb2
from router.kv_index import first_sequence, last_sequence
from router.routing import SchedulerLink

# Events per response (and per XREAD), and how long one read waits for new events.
_BATCH = 500
_BLOCK_MS = 1000


class KvApiError(Exception):
    """Ends a call with ``code``."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


async def subscribe_kv_events(redis: Any, request: generate_pb2.SubscribeKvEventsRequest,
                              keys: RedisKeys = DEFAULT_KEYS
                              ) -> AsyncIterator[generate_pb2.SubscribeKvEventsResponse]:
    """The event log from the requested position, then live, batch by batch.

    Raises:
        KvApiError: FAILED_PRECONDITION without Redis; OUT_OF_RANGE if the start (or the
            subscriber's position, for a slow subscriber) was trimmed from the log;
            DATA_LOSS if the log restarted below the subscriber's position.
    """
    if redis is None:
        raise KvApiError(grpc.StatusCode.FAILED_PRECONDITION,
                         "KV events need the router to have --redis-url")
    if request.HasField("start_sequence_number"):
        start = request.start_sequence_number
        oldest = await first_sequence(redis, keys)
        if start == 0:
            start = max(oldest, 1)
        position = start - 1
    else:
        position = await last_sequence(redis, keys)
    while True:
        reply = await redis.xread({keys.kv_events_stream: entry_id(position)},
                                  count=_BATCH, block=_BLOCK_MS)
        entries = reply[0][1] if reply else []
        if not entries:
            if await last_sequence(redis, keys) < position:
                raise KvApiError(grpc.StatusCode.DATA_LOSS,
                                 f"the KV event log restarted below sequence {position} "
                                 "(Redis lost it); resubscribe with start_sequence_number=1")
            continue
        first = sequence_of(entries[0][0])
        if first != position + 1:
            raise KvApiError(grpc.StatusCode.OUT_OF_RANGE,
                             f"start_sequence_number {position + 1} is no longer in the KV "
                             f"event log (the oldest retained is {first}); resubscribe "
                             "from there after reloading the state")
        response = generate_pb2.SubscribeKvEventsResponse()
        for raw_id, fields in entries:
            position = sequence_of(raw_id)
            event = decode(fields.get(b"e", fields.get("e")), position)
            response.events.append(to_pb(event))
        yield response


async def get_loads(links: Sequence[SchedulerLink],
                    on_failure: Callable[[SchedulerLink], None] | None = None
                    ) -> generate_pb2.GetLoadsResponse:
    """Every reachable scheduler's load and its workers', asked now.

    Args:
        on_failure: called with each link that did not answer (the pool routes around it).
    """
    replies = await asyncio.gather(
        *(link.stub.GetStats(generate_pb2.GetServerStatsRequest(), timeout=2.0)
          for link in links), return_exceptions=True)
    response = generate_pb2.GetLoadsResponse()
    for link, stats in zip(links, replies, strict=True):
        if isinstance(stats, BaseException):
            if on_failure is not None and isinstance(stats, grpc.aio.AioRpcError):
                on_failure(link)
            continue
        load = response.schedulers.add(
            scheduler_id=link.info.scheduler_id if link.info is not None else "",
            address=link.address, num_requests_running=stats.num_requests_running,
            num_requests_waiting=stats.num_requests_waiting,
            prefix_cache_hit_rate=_rate(stats.prefix_cache_hits, stats.prefix_cache_queries))
        num_total = num_free = 0
        for worker in stats.workers:
            num_total += worker.kv_blocks_total
            num_free += worker.kv_blocks_free
            load.workers.add(
                worker_id=worker.worker_id, num_requests_running=worker.num_requests_running,
                num_requests_waiting=worker.num_requests_waiting,
                kv_usage=_rate(worker.kv_blocks_total - worker.kv_blocks_free,
                               worker.kv_blocks_total),
                prefix_cache_hit_rate=_rate(worker.prefix_cache_hits,
                                            worker.prefix_cache_queries),
                kv_blocks_total=worker.kv_blocks_total, kv_blocks_free=worker.kv_blocks_free,
                num_queued_tokens=worker.num_queued_tokens, is_alive=worker.is_alive)
        load.kv_usage = _rate(num_total - num_free, num_total)
    return response


def _rate(num: int, den: int) -> float:
    return num / den if den else 0.0
