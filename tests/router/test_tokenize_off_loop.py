"""A huge prompt is tokenized off the router's event loop: a stream running beside it keeps
getting its tokens. Real router and client over loopback gRPC; the upstream is a small
scheduler service that streams one token every 10 ms to any request."""

from __future__ import annotations

import asyncio
import time

from gridllm.client import AsyncClient
from gridllm.common.sampling_params import SamplingParams
from tests.router.ticking import router_over_ticking

# A context long enough that a prompt of megabytes is valid and takes seconds to tokenize.
MAX_MODEL_LEN = 1 << 22
NUM_CANARY_TOKENS = 200


def test_a_huge_prompt_does_not_freeze_a_running_stream(tiny_tokenizer):
    big = "The quick brown fox jumps over the lazy dog. café 日本語 " * 20_000  # ~1 MB
    num_big_tokens = len(tiny_tokenizer.encode(big))

    async def main():
        async with router_over_ticking(tiny_tokenizer, MAX_MODEL_LEN) as target:
            async with AsyncClient(target, timeout=60.0) as client:
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
