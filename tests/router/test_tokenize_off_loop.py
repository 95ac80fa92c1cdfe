"""A huge prompt is tokenized off the router's event loop: a stream running beside it keeps
getting its tokens. Real router and client over loopback gRPC; the upstream is a small
scheduler service that streams one token every 10 ms to any request."""

from __future__ import annotations

import asyncio
import time

import grpc

from gridllm.client import AsyncClient
from gridllm.common.grpc_utils import ServiceServer
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import generate_pb2, generate_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from router.routing import SchedulerPool
from router.server import SERVICE_NAME, GenerationServicer, RouterOptions

# A context long enough that a prompt of megabytes is valid and takes seconds to tokenize.
MAX_MODEL_LEN = 1 << 22
NUM_CANARY_TOKENS = 200


class TickingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Streams a token every 10 ms until ``max_tokens``."""

    async def Submit(self, request, context):
        for k in range(request.sampling_params.max_tokens):
            await asyncio.sleep(0.01)
            yield scheduler_pb2.SubmitResponse(
                request_id=request.request_id, token_ids=[40 + k % 50],
                finish_reason=(generate_pb2.FINISH_REASON_LENGTH
                               if k == request.sampling_params.max_tokens - 1 else 0))

    async def GetInfo(self, request, context):
        return scheduler_pb2.SchedulerInfo(scheduler_id="ticking", model="m",
                                           max_model_len=MAX_MODEL_LEN, vocab_size=320,
                                           block_size=16, num_workers=1, eos_token_id=1)

    async def GetStats(self, request, context):
        return generate_pb2.GetServerStatsResponse()


def test_a_huge_prompt_does_not_freeze_a_running_stream(tiny_tokenizer):
    big = "The quick brown fox jumps over the lazy dog. café 日本語 " * 20_000  # ~1 MB
    num_big_tokens = len(tiny_tokenizer.encode(big))

    async def main():
        upstream = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(TickingScheduler(), upstream)
        upstream_port = upstream.add_insecure_port("127.0.0.1:0")
        await upstream.start()
        pool = SchedulerPool([f"127.0.0.1:{upstream_port}"], poll_interval_s=0.05)
        pool.start()
        router = ServiceServer([SERVICE_NAME])
        servicer = GenerationServicer(tiny_tokenizer, [1], pool,
                                      RouterOptions("m", scheduler_wait_s=10.0))
        generate_pb2_grpc.add_GenerationServicer_to_server(servicer, router.server)
        port = await router.start("127.0.0.1:0")
        try:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=60.0) as client:
                arrivals: list[float] = []

                async def canary():
                    params = SamplingParams(max_tokens=NUM_CANARY_TOKENS)
                    async for _ in client.generate_stream("Hello", params):
                        arrivals.append(time.perf_counter())

                canary_task = asyncio.create_task(canary())
                while len(arrivals) < 20:
                    await asyncio.sleep(0.01)
                sent = time.perf_counter()
                output = await client.generate(big, SamplingParams(max_tokens=1))
                big_done = time.perf_counter()
                await canary_task
                return arrivals, sent, big_done, output
        finally:
            await router.stop(0)
            servicer.close()
            await pool.close()
            await upstream.stop(0)

    arrivals, sent, big_done, output = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert output.usage.prompt_tokens == num_big_tokens
    assert len(arrivals) == NUM_CANARY_TOKENS
    # While the big prompt was tokenized (and sent on) the canary kept getting tokens, about
    # one per 10 ms; tokenizing on the event loop stalls it for the whole time.
    busy_s = big_done - sent
    during = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)
              if sent <= b <= big_done]
    assert busy_s >= 0.3
    assert len(during) >= busy_s / 0.01 / 4, (len(during), busy_s)
    assert max(during) < 0.4, (max(during), busy_s)
