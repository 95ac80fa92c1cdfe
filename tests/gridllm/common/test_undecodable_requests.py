"""Bytes that are not the request message get INVALID_ARGUMENT (gRPC's own answer is UNKNOWN),
and the server keeps serving the next call on the same connection."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gridllm.common.grpc_utils import ServiceServer
from gridllm.v1 import generate_pb2, generate_pb2_grpc


class _Echo(generate_pb2_grpc.GenerationServicer):
    async def Generate(self, request, context):
        yield generate_pb2.GenerateResponse(text=request.prompt)

    async def Tokenize(self, request, context):
        return generate_pb2.TokenizeResponse(token_ids=[len(request.text)])


UNDECODABLE = [
    b"\xff\xff\xff",  # not the wire format
    b"\x0a\x02\xff\xfe",  # field 1 (prompt / text) with bad UTF-8
    b"\x0a\x10abc",  # a length past the end
]


@pytest.mark.parametrize("raw", UNDECODABLE)
def test_undecodable_requests_get_invalid_argument(raw):
    async def main():
        server = ServiceServer(["gridllm.v1.Generation"])
        generate_pb2_grpc.add_GenerationServicer_to_server(_Echo(), server.server)
        port = await server.start("127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                generate = channel.unary_stream("/gridllm.v1.Generation/Generate",
                                                request_serializer=lambda b: b)
                tokenize = channel.unary_unary("/gridllm.v1.Generation/Tokenize",
                                               request_serializer=lambda b: b)
                errors = []
                for call in (lambda: generate(raw, timeout=5).read(),
                             lambda: tokenize(raw, timeout=5)):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call()
                    errors.append((info.value.code(), info.value.details()))
                stub = generate_pb2_grpc.GenerationStub(channel)
                after = [r.text async for r in stub.Generate(
                    generate_pb2.GenerateRequest(prompt="still here"), timeout=5)]
                return errors, after
        finally:
            await server.stop(0)

    errors, after = asyncio.run(main())
    for code, details in errors:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("the request could not be parsed: Error parsing message")
    assert after == ["still here"]
