"""The shared server plumbing: exception mapping, health, reflection, drain."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gridllm.common.grpc_utils import ServiceServer

_SERVICE = "test.Echo"


def _raise(kind: str):
    if kind == "value":
        raise ValueError("temperature must be non-negative, got -1.")
    if kind == "key":
        raise KeyError("req-7")
    if kind == "internal":
        raise RuntimeError("boom")


async def _unary(request: bytes, context) -> bytes:
    _raise(request.decode())
    return request


async def _stream(request: bytes, context):
    yield b"first"
    _raise(request.decode())
    yield b"second"


async def _slow(request: bytes, context) -> bytes:
    await asyncio.sleep(float(request.decode()))
    return b"done"


def _server() -> ServiceServer:
    server = ServiceServer([_SERVICE])
    server.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(_SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
    })])
    return server


@pytest.mark.parametrize("kind,code,text", [
    ("value", grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("key", grpc.StatusCode.NOT_FOUND, "req-7"),
    ("internal", grpc.StatusCode.INTERNAL, "boom"),
])
def test_exceptions_become_status_codes(kind, code, text):
    async def main():
        server = _server()
        port = await server.start("127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as unary:
                    await channel.unary_unary(f"/{_SERVICE}/Unary")(kind.encode(), timeout=5)
                call = channel.unary_stream(f"/{_SERVICE}/Stream")(kind.encode(), timeout=5)
                received = []
                with pytest.raises(grpc.aio.AioRpcError) as stream:
                    async for item in call:
                        received.append(item)
                ok = await channel.unary_unary(f"/{_SERVICE}/Unary")(b"fine", timeout=5)
                return unary.value, stream.value, received, ok
        finally:
            await server.stop(0)

    unary, stream, received, ok = asyncio.run(main())
    for error in (unary, stream):
        assert error.code() == code and text in error.details()
    assert received == [b"first"] and ok == b"fine"


def test_health_reflection_and_graceful_drain():
    async def main():
        server = _server()
        port = await server.start("127.0.0.1:0")
        target = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=_SERVICE)
            before = (await health.Check(request, timeout=5)).status
            await server.set_serving(True)
            after = (await health.Check(request, timeout=5)).status
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = [r async for r in reflect.ServerReflectionInfo(iter([
                reflection_pb2.ServerReflectionRequest(list_services=""),
            ]))]
            names = {s.name for s in replies[0].list_services_response.service}
            # An in-flight call finishes within the grace period; new calls are refused.
            slow = asyncio.ensure_future(channel.unary_unary(f"/{_SERVICE}/Slow")(b"0.3"))
            await asyncio.sleep(0.1)
            stop = asyncio.ensure_future(server.stop(grace=5))
            await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary(f"/{_SERVICE}/Unary")(b"late", timeout=2)
            drained = await slow
            await stop
            return before, after, names, drained

    before, after, names, drained = asyncio.run(main())
    assert before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert after == health_pb2.HealthCheckResponse.SERVING
    assert {_SERVICE, "grpc.health.v1.Health"} <= names
    assert drained == b"done"
