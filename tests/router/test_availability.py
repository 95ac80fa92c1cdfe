"""The router as its scheduler comes and goes: readiness follows "a scheduler with a live
worker answers", new requests are refused at once without one, a request in flight is held
for ``scheduler_wait_s`` and resubmitted when the scheduler is back (else UNAVAILABLE), and a
draining router refuses new requests while its in-flight ones finish.

A real RouterServer on loopback in front of a scripted scheduler that can lose its workers,
die and come back on the same port.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gridllm.client import AsyncClient
from gridllm.common.contract import FinishReason, RequestUpdate
from gridllm.common.convert import request_update_to_pb, sampling_params_from_pb
from gridllm.common.grpc_utils import LIVENESS_SERVICE, free_port
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import generate_pb2, scheduler_pb2, scheduler_pb2_grpc
from router.server import RouterOptions, RouterServer

SCHEDULER_WAIT_S = 1.0
PROMPT = [5, 6, 7, 8]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def token_at(position: int) -> int:
    return 10 + position % 50


class PacedScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Streams ``token_at(k)`` for k = len(outputs so far) .. max_tokens - 1, one every
    ``pace_s`` seconds, then LENGTH. ``num_workers`` is what GetInfo reports."""

    def __init__(self, pace_s: float = 0.02):
        self.pace_s = pace_s
        self.num_workers = 1
        self.submitted_ids: list[str] = []

    async def Submit(self, request, context):
        self.submitted_ids.append(request.request_id)
        max_tokens = sampling_params_from_pb(request.sampling_params).max_tokens
        for k in range(len(request.output_token_ids), max_tokens):
            await asyncio.sleep(self.pace_s)
            finish = FinishReason.LENGTH if k == max_tokens - 1 else None
            yield request_update_to_pb(RequestUpdate(request.request_id, [token_at(k)],
                                                     finish_reason=finish))

    async def GetInfo(self, request, context):
        return scheduler_pb2.SchedulerInfo(scheduler_id="paced", model="m", max_model_len=4096,
                                           vocab_size=320, block_size=16,
                                           num_workers=self.num_workers, eos_token_id=1)

    async def GetStats(self, request, context):
        return generate_pb2.GetServerStatsResponse()


class Upstream:
    """The scheduler process, on a fixed port, that can die and come back."""

    def __init__(self, scheduler: PacedScheduler):
        self.scheduler = scheduler
        self.port = free_port()
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self.server = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.scheduler, self.server)
        assert self.server.add_insecure_port(f"127.0.0.1:{self.port}") == self.port
        await self.server.start()

    async def kill(self) -> None:
        assert self.server is not None
        await self.server.stop(0)
        self.server = None


async def _status(target: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
        return reply.status


async def _wait_status(target: str, wanted: int, timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while await _status(target) != wanted:
        assert time.monotonic() - start < timeout_s, f"router never reported {wanted}"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def _collect(client: AsyncClient, max_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return [t async for chunk in client.generate_stream(
        None, params, prompt_token_ids=PROMPT, return_token_ids=True) for t in chunk.token_ids]


async def _refused(client: AsyncClient) -> tuple[grpc.StatusCode, str, float]:
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(client, 3)
    return info.value.code(), info.value.details(), time.monotonic() - start


@pytest.fixture
def model_dir(tmp_path):
    # No tokenizer files: token-id prompts only (the router needs nothing else here).
    return str(tmp_path)


def test_router_health_and_requests_follow_the_scheduler(model_dir):
    scheduler = PacedScheduler()
    upstream = Upstream(scheduler)

    async def main():
        seen: dict[str, object] = {}
        await upstream.start()
        router = RouterServer(RouterOptions(
            model=model_dir, scheduler_addresses=[f"127.0.0.1:{upstream.port}"],
            scheduler_wait_s=SCHEDULER_WAIT_S))
        port = await router.start("127.0.0.1:0")
        target = f"127.0.0.1:{port}"
        try:
            seen["live_at_start"] = await _status(target, LIVENESS_SERVICE)
            await _wait_status(target, SERVING)
            async with AsyncClient(target, timeout=30.0) as client:
                # The scheduler loses its last worker: NOT_SERVING, new requests refused.
                scheduler.num_workers = 0
                seen["not_serving_after_s"] = await _wait_status(target, NOT_SERVING)
                seen["no_worker"] = await _refused(client)
                scheduler.num_workers = 1
                seen["serving_again_after_s"] = await _wait_status(target, SERVING)

                # The scheduler dies mid-stream and is back within the wait: the stream
                # resumes where it was; meanwhile a new request is refused at once.
                held = asyncio.create_task(_collect(client, 60))
                await asyncio.sleep(0.3)
                await upstream.kill()
                await _wait_status(target, NOT_SERVING)
                seen["while_down"] = await _refused(client)
                seen["live_while_down"] = await _status(target, LIVENESS_SERVICE)
                await asyncio.sleep(SCHEDULER_WAIT_S / 3)
                await upstream.start()
                seen["held"] = await held
                seen["submitted"] = list(scheduler.submitted_ids)

                # It dies again and stays dead: the held request gives up after the wait.
                stranded = asyncio.create_task(_collect(client, 200))
                await asyncio.sleep(0.3)
                await upstream.kill()
                killed_at = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stranded
                seen["stranded"] = (info.value.code(), info.value.details(),
                                    time.monotonic() - killed_at)
        finally:
            await router.server.stop(0)
            await router.stop()
            if upstream.server is not None:
                await upstream.kill()
        return seen

    seen = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert seen["live_at_start"] == SERVING and seen["live_while_down"] == SERVING
    # The pool polls every 0.5 s.
    assert seen["not_serving_after_s"] < 1.5 and seen["serving_again_after_s"] < 1.5
    for key in ("no_worker", "while_down"):
        code, details, seconds = seen[key]
        assert code == grpc.StatusCode.UNAVAILABLE, (key, details)
        assert "no scheduler with a live worker" in details
        assert seconds < 0.5, (key, seconds)  # at once, not after the wait
    assert seen["held"] == [token_at(k) for k in range(60)]
    assert len(seen["submitted"]) == 2 and "~1" in seen["submitted"][1]
    code, details, seconds = seen["stranded"]
    assert code == grpc.StatusCode.UNAVAILABLE and "came back within" in details
    assert SCHEDULER_WAIT_S <= seconds < SCHEDULER_WAIT_S + 2.0


def test_a_draining_router_finishes_streams_and_refuses_new_requests(model_dir):
    upstream = Upstream(PacedScheduler(pace_s=0.01))

    async def main():
        await upstream.start()
        router = RouterServer(RouterOptions(
            model=model_dir, scheduler_addresses=[f"127.0.0.1:{upstream.port}"]))
        port = await router.start("127.0.0.1:0")
        target = f"127.0.0.1:{port}"
        try:
            await _wait_status(target, SERVING)
            async with AsyncClient(target, timeout=30.0) as client:
                streams = [asyncio.create_task(_collect(client, 80)) for _ in range(4)]
                await asyncio.sleep(0.2)
                stop = asyncio.create_task(router.server.stop(grace=10.0))
                await asyncio.sleep(0.05)
                refused = await _refused(client)
                texts = await asyncio.gather(*streams)
                await stop
            return refused, texts
        finally:
            await router.stop()
            await upstream.kill()

    (code, details, _), texts = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert texts == [[token_at(k) for k in range(80)]] * 4
