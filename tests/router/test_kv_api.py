"""router.kv_api.subscribe_kv_events against a real Redis event log: replay, live tail,
and the errors a subscriber can act on."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis

from gridllm.common import kv_events
from gridllm.common.kv_events import BlockStored, KvEvent
from gridllm.common.redis_keys import DEFAULT_KEYS as KEYS
from gridllm.v1 import generate_pb2
from router.kv_api import KvApiError, subscribe_kv_events


def _request(start: int | None = None) -> generate_pb2.SubscribeKvEventsRequest:
    request = generate_pb2.SubscribeKvEventsRequest()
    if start is not None:
        request.start_sequence_number = start
    return request


async def _append(client, first: int, last: int) -> None:
    for seq in range(first, last + 1):
        event = KvEvent(f"w{seq % 3}", BlockStored([seq], None, [seq] * 4, 4), "s", float(seq))
        await client.xadd(KEYS.kv_events_stream, {"e": kv_events.encode(event)},
                          id=kv_events.entry_id(seq))


async def _take(stream, num: int) -> list[int]:
    """Sequence numbers of the first ``num`` events of a subscription."""
    seen: list[int] = []
    async for batch in stream:
        seen += [e.sequence_number for e in batch.events]
        if len(seen) >= num:
            break
    await stream.aclose()
    return seen


def _scenario(redis_server, body):
    async def main():
        client = aioredis.from_url(redis_server.rsplit("/", 1)[0] + "/7")
        await client.flushdb()
        try:
            return await asyncio.wait_for(body(client), 20)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_replay_from_a_number_then_live_events(redis_server):
    async def body(client):
        await _append(client, 1, 30)
        replayed = await _take(subscribe_kv_events(client, _request(12)), 19)
        from_oldest = await _take(subscribe_kv_events(client, _request(0)), 30)
        # Live only: events appended after the call starts.
        live = subscribe_kv_events(client, _request())
        reader = asyncio.ensure_future(_take(live, 5))
        await asyncio.sleep(0.3)
        await _append(client, 31, 35)
        return replayed, from_oldest, await reader

    replayed, from_oldest, live = _scenario(redis_server, body)
    assert replayed == list(range(12, 31))
    assert from_oldest == list(range(1, 31))
    assert live == list(range(31, 36))


def test_a_trimmed_start_is_out_of_range_and_names_the_field(redis_server):
    async def body(client):
        await _append(client, 1, 40)
        await client.xtrim(KEYS.kv_events_stream, maxlen=10, approximate=False)
        with pytest.raises(KvApiError) as info:
            await _take(subscribe_kv_events(client, _request(5)), 1)
        # From the oldest retained instead: fine.
        oldest = await _take(subscribe_kv_events(client, _request(0)), 10)
        return info.value, oldest

    error, oldest = _scenario(redis_server, body)
    assert error.code == grpc.StatusCode.OUT_OF_RANGE
    assert "start_sequence_number 5" in error.details and "31" in error.details
    assert oldest == list(range(31, 41))


def test_a_restarted_log_is_data_loss(redis_server):
    async def body(client):
        await _append(client, 1, 20)
        stream = subscribe_kv_events(client, _request(21))
        reader = asyncio.ensure_future(_take(stream, 1))
        await asyncio.sleep(0.3)
        await client.delete(KEYS.kv_events_stream)
        await _append(client, 1, 3)  # Redis lost the log; numbering starts again
        with pytest.raises(KvApiError) as info:
            await reader
        return info.value

    error = _scenario(redis_server, body)
    assert error.code == grpc.StatusCode.DATA_LOSS and "start_sequence_number=1" in error.details


def test_without_redis_subscribing_is_refused():
    async def body():
        with pytest.raises(KvApiError) as info:
            await _take(subscribe_kv_events(None, _request(1)), 1)
        return info.value

    assert asyncio.run(body()).code == grpc.StatusCode.FAILED_PRECONDITION
