"""The router process's exposure settings (a real RouterServer on loopback in front of a
ticking scheduler): health, reflection and metrics closed on request, a bad key file refused,
and the per-connection stream limit."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gridllm import healthcheck
from gridllm.client import build_generate_request
from gridllm.common.auth import API_KEY_ENV
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import generate_pb2_grpc
from router.server import RouterOptions, RouterServer
from tests.e2e.tiny_model import build_tokenizer
from tests.router.ticking import TickingScheduler

KEY = "router-key-0123456789"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(str(path))
    return str(path)


@contextlib.asynccontextmanager
async def router(tokenizer_dir: str, **options):
    """A RouterServer (gRPC and HTTP on free loopback ports) over a TickingScheduler."""
    from gridllm.v1 import scheduler_pb2_grpc

    upstream = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(TickingScheduler(), upstream)
    upstream_port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    server = RouterServer(RouterOptions(
        model=tokenizer_dir, scheduler_addresses=[f"127.0.0.1:{upstream_port}"], port=0,
        http_port=0, **options))
    try:
        port = await server.start()
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.server.stop(0)
        await server.stop()
        await upstream.stop(0)


def http_status(url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_health_reflection_and_metrics_can_ask_for_a_key(tokenizer_dir, monkeypatch):
    def reflect(metadata) -> None:
        # The synchronous client: grpcio's asyncio client can report INTERNAL instead of the
        # server's status when its request write lands after an early status (a refused
        # client-streaming call), a race in the client, not in the server's answer.
        with grpc.insecure_channel(target) as channel:
            next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=metadata, timeout=10))

    async def check(metadata) -> list:
        results = []
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="liveness"), metadata=metadata)
                results.append("OK")
            except grpc.aio.AioRpcError as error:
                results.append(error.code().name)
        try:
            await asyncio.get_running_loop().run_in_executor(None, reflect, metadata)
            results.append("OK")
        except grpc.RpcError as error:
            results.append(error.code().name)
        return results

    async def main(**closed):
        nonlocal target
        async with router(tokenizer_dir, api_keys=[KEY], **closed) as (server, target):
            base = f"http://127.0.0.1:{server.http_port}"
            loop = asyncio.get_running_loop()
            statuses = [await loop.run_in_executor(None, http_status, base + path, key)
                        for key in (None, KEY) for path in ("/health", "/ready", "/metrics")]
            # The container probe sends $GRIDLLM_API_KEY when set.
            probes = []
            for key in (None, KEY):
                if key:
                    monkeypatch.setenv(API_KEY_ENV, key)
                probes.append((await loop.run_in_executor(
                    None, healthcheck.check, target, "liveness", 5.0))[0])
            monkeypatch.delenv(API_KEY_ENV)
            return (await check(()), await check((("authorization", f"Bearer {KEY}"),)),
                    statuses, probes)

    target = ""
    # /ready is 503 until the ticking scheduler is seen; either way it is not 401.
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    without, with_key, statuses, probes = asyncio.run(main())
    assert without == with_key == ["OK", "OK"]
    assert 401 not in statuses and probes == [True, True]
    without, with_key, statuses, probes = asyncio.run(main(
        auth_health=True, auth_reflection=True, auth_metrics=True))
    assert without == ["UNAUTHENTICATED", "UNAUTHENTICATED"] and with_key == ["OK", "OK"]
    assert statuses[:3] == [401, 401, 401] and 401 not in statuses[3:]
    assert probes == [False, True]


def test_a_bad_key_file_stops_the_router_before_it_binds(tokenizer_dir, tmp_path):
    path = tmp_path / "keys"
    path.write_text("tiny alice\n")
    with pytest.raises(ValueError, match=f"{path}:1"):
        RouterServer(RouterOptions(model=tokenizer_dir, scheduler_addresses=["127.0.0.1:1"],
                                   api_key_file=str(path)))
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        RouterOptions(model="m", max_concurrent_streams=0)


def test_one_connection_holds_at_most_max_concurrent_streams(tokenizer_dir):
    request = build_generate_request(prompt_token_ids=[5, 6, 7],
                                     sampling_params=SamplingParams(max_tokens=30))

    async def main():
        async with router(tokenizer_dir, max_concurrent_streams=2) as (server, target):
            peak = 0

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, server.engine.num_streams)
                    await asyncio.sleep(0.005)

            async def streams(num: int, channel) -> list[int]:
                stub = generate_pb2_grpc.GenerationStub(channel)
                return await asyncio.gather(*(_num_messages(stub, request)
                                              for _ in range(num)))

            watcher = asyncio.create_task(watch())
            # Its own subchannel pool: each channel is a connection of its own.
            options = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(target, options=options) as one:
                counts = await streams(5, one)
            one_connection, peak = peak, 0
            async with grpc.aio.insecure_channel(target, options=options) as a, \
                    grpc.aio.insecure_channel(target, options=options) as b:
                counts += sum(await asyncio.gather(streams(2, a), streams(2, b)), [])
            watcher.cancel()
            return one_connection, peak, counts

    one_connection, two_connections, counts = asyncio.run(asyncio.wait_for(main(), 60))
    # All were served, the ones past the limit after waiting for a free stream.
    assert len(counts) == 9 and min(counts) > 0
    assert one_connection == 2
    assert two_connections == 4


async def _num_messages(stub, request) -> int:
    # A stream opened as another ends may be refused (REFUSED_STREAM: UNAVAILABLE) before the
    # server counted the other closed: clients retry those, as after any UNAVAILABLE.
    for _ in range(20):
        try:
            return len([message async for message in stub.Generate(request, timeout=30.0)])
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.05)
    raise AssertionError("a stream was refused 20 times")
