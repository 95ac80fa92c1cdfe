"""A burst of thousands of calls reaches the handlers: gRPC's own pending-call limits (1,000
then 3,000 calls, 30 s) would cancel some of them with a bare CANCELLED before any handler saw
them; the services' admission control is what refuses load."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc

from gridllm.common.grpc_utils import ServiceServer
from gridllm.v1 import generate_pb2, generate_pb2_grpc

NUM_CALLS = 3000


class _Slow(generate_pb2_grpc.GenerationServicer):
    def __init__(self):
        self.num_started = 0

    async def Generate(self, request, context):
        self.num_started += 1
        for _ in range(4):
            await asyncio.sleep(0.2)
            yield generate_pb2.GenerateResponse(text="x")


def test_a_burst_of_streams_is_served_not_cancelled():
    async def main():
        servicer = _Slow()
        server = ServiceServer(["gridllm.v1.Generation"])
        generate_pb2_grpc.add_GenerationServicer_to_server(servicer, server.server)
        port = await server.start("127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = generate_pb2_grpc.GenerationStub(channel)

                async def one() -> str:
                    try:
                        async for _ in stub.Generate(generate_pb2.GenerateRequest(prompt="a"),
                                                     timeout=60):
                            pass
                        return "OK"
                    except grpc.aio.AioRpcError as exc:
                        return exc.code().name

                codes = await asyncio.gather(*(one() for _ in range(NUM_CALLS)))
            return Counter(codes), servicer.num_started
        finally:
            await server.stop(0)

    codes, num_started = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert codes == Counter({"OK": NUM_CALLS})
    assert num_started == NUM_CALLS
