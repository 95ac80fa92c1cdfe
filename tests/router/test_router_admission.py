"""Past max_num_streams the router answers RESOURCE_EXHAUSTED with a retry hint at once (and
the streams it serves are undisturbed); a scheduler's own refusal keeps its retry hint."""

from __future__ import annotations

import asyncio

import grpc

from gridllm.client import AsyncClient
from gridllm.common.grpc_utils import RETRY_AFTER_KEY
from gridllm.common.sampling_params import SamplingParams
from tests.router.ticking import router_over_ticking


def test_streams_past_the_limit_are_refused_with_a_retry_hint(tiny_tokenizer):
    async def main():
        async with router_over_ticking(tiny_tokenizer, max_num_streams=2) as target:
            async with AsyncClient(target, timeout=30.0) as client:
                async def stream():
                    return [c async for c in client.generate_stream(
                        "Hello", SamplingParams(max_tokens=50), return_token_ids=True)]

                running = [asyncio.create_task(stream()) for _ in range(2)]
                await asyncio.sleep(0.2)
                try:
                    await client.generate("Hello", SamplingParams(max_tokens=1))
                except grpc.aio.AioRpcError as exc:
                    refusal = exc
                outputs = await asyncio.gather(*running)
                # Room again once they finished.
                after = await client.generate("Hello", SamplingParams(max_tokens=1))
                return refusal, outputs, after

    refusal, outputs, after = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_num_streams=2" in refusal.details()
    assert dict(refusal.trailing_metadata()).get(RETRY_AFTER_KEY) == "1000"
    for chunks in outputs:
        assert [t for c in chunks for t in c.token_ids] == [40 + k for k in range(50)]
    assert after.outputs[0].finish_reason == "length"
