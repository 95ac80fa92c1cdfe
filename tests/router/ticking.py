"""A small scheduler service for router tests: any request gets one token every 10 ms."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from gridllm.common.grpc_utils import ServiceServer
from gridllm.v1 import generate_pb2, generate_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from router.routing import SchedulerPool
from router.server import SERVICE_NAME, GenerationServicer, RouterOptions


class TickingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Streams a token every 10 ms until ``max_tokens``; serves a model of ``max_model_len``
    tokens and a vocabulary of 320."""

    def __init__(self, max_model_len: int = 4096):
        self.max_model_len = max_model_len

    async def Submit(self, request, context):
        for k in range(request.sampling_params.max_tokens):
            await asyncio.sleep(0.01)
            yield scheduler_pb2.SubmitResponse(
                request_id=request.request_id, token_ids=[40 + k % 50],
                finish_reason=(generate_pb2.FINISH_REASON_LENGTH
                               if k == request.sampling_params.max_tokens - 1 else 0))

    async def GetInfo(self, request, context):
        return scheduler_pb2.SchedulerInfo(scheduler_id="ticking", model="m",
                                           max_model_len=self.max_model_len, vocab_size=320,
                                           block_size=16, num_workers=1, eos_token_id=1)

    async def GetStats(self, request, context):
        return generate_pb2.GetServerStatsResponse()


@contextlib.asynccontextmanager
async def router_over_ticking(tokenizer, max_model_len: int = 4096, **options):
    """A real router (GenerationServicer over loopback gRPC) in front of a TickingScheduler.

    Yields:
        ``host:port`` of the router.
    """
    upstream = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(TickingScheduler(max_model_len), upstream)
    upstream_port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    pool = SchedulerPool([f"127.0.0.1:{upstream_port}"], poll_interval_s=0.05)
    pool.start()
    router = ServiceServer([SERVICE_NAME])
    servicer = GenerationServicer(tokenizer, [1], pool,
                                  RouterOptions("m", scheduler_wait_s=10.0, **options))
    generate_pb2_grpc.add_GenerationServicer_to_server(servicer, router.server)
    port = await router.start("127.0.0.1:0")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await router.stop(0)
        servicer.close()
        await pool.close()
        await upstream.stop(0)
