"""The router's HTTP front in-process, against scripted schedulers on loopback gRPC, through
the official ``openai`` client: refusals (429 with the scheduler's retry hint, 503 without a
scheduler), log-probabilities, batched prompts and echo, and the gRPC front's retry hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.error
import urllib.request

import grpc
import pytest

from gridllm.common.contract import FinishReason
from gridllm.common.grpc_utils import ServiceServer, free_port
from gridllm.common.http_server import HttpServer
from gridllm.v1 import generate_pb2, generate_pb2_grpc, scheduler_pb2_grpc
from router.engine_client import EngineClient
from router.http_api import HttpApi
from router.metrics import RouterMetrics
from router.routing import SchedulerPool
from router.server import SERVICE_NAME, GenerationServicer, RouterOptions
from tests.router.test_generate import ReplayScheduler, script

openai = pytest.importorskip("openai")


class RefusingScheduler(ReplayScheduler):
    """Refuses every Submit as a full queue does, with a retry hint."""

    async def Submit(self, request, context):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the scheduler's queue is full",
                            trailing_metadata=(("retry-after-ms", "1500"),))
        yield  # an async generator, as the real Submit


@contextlib.asynccontextmanager
async def serving(tok, scheduler: ReplayScheduler | None, scheduler_wait_s: float = 10.0):
    """An HTTP front (and a gRPC one) over ``scheduler`` (None: an address nobody serves)."""
    upstream = None
    address = f"127.0.0.1:{free_port()}"
    if scheduler is not None:
        upstream = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, upstream)
        address = f"127.0.0.1:{upstream.add_insecure_port('127.0.0.1:0')}"
        await upstream.start()
    pool = SchedulerPool([address], poll_interval_s=0.05)
    pool.start()
    options = RouterOptions("m", served_model_name="served", scheduler_wait_s=scheduler_wait_s)
    engine = EngineClient(tok, [1], pool, scheduler_wait_s, 3, RouterMetrics())
    api = HttpApi(engine, "served", ["m"], engine.metrics, lambda: bool(pool.alive()))
    http = HttpServer(api.asgi(), "127.0.0.1", 0)
    grpc_server = ServiceServer([SERVICE_NAME])
    generate_pb2_grpc.add_GenerationServicer_to_server(
        GenerationServicer(tok, [1], pool, options, engine), grpc_server.server)
    grpc_port = await grpc_server.start("127.0.0.1:0")
    port = await http.start()
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                max_retries=0, timeout=30.0)
    try:
        yield client, grpc_port
    finally:
        await client.close()
        await http.stop(0.5)
        await grpc_server.stop(0)
        await pool.close()
        if upstream is not None:
            await upstream.stop(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_a_full_scheduler_queue_is_429_with_its_retry_hint(tiny_tokenizer):
    async def main():
        async with serving(tiny_tokenizer, RefusingScheduler({})) as (client, grpc_port):
            for stream in (False, True):
                with pytest.raises(openai.RateLimitError) as error:
                    await client.completions.create(model="served", prompt="Hello",
                                                    max_tokens=4, stream=stream)
                headers = error.value.response.headers
                assert (headers["retry-after"], headers["retry-after-ms"]) == ("2", "1500")
                assert "queue is full" in error.value.body["message"]
            # The gRPC front forwards the hint as trailing metadata.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                call = generate_pb2_grpc.GenerationStub(channel).Generate(
                    generate_pb2.GenerateRequest(prompt="Hello"))
                with pytest.raises(grpc.aio.AioRpcError) as rpc_error:
                    async for _ in call:
                        pass
                assert rpc_error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert ("retry-after-ms", "1500") in tuple(rpc_error.value.trailing_metadata())

    run(main())


def test_no_scheduler_is_503_and_not_ready(tiny_tokenizer):
    async def main():
        async with serving(tiny_tokenizer, None, scheduler_wait_s=0.3) as (client, _):
            with pytest.raises(openai.APIStatusError) as error:
                await client.chat.completions.create(
                    model="served", messages=[{"role": "user", "content": "hi"}])
            assert error.value.status_code == 503
            assert error.value.body["type"] == "service_unavailable_error"
            root = str(client.base_url).removesuffix("/v1/")
            return await asyncio.to_thread(_get_status, root + "/ready"), \
                await asyncio.to_thread(_get_status, root + "/health")

    assert run(main()) == (503, 200)


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_logprobs_of_completions_and_chat(tiny_tokenizer):
    token_ids = tiny_tokenizer.encode("Hello world, hello")
    scripts = {"r1": script("r1", token_ids, 2, FinishReason.LENGTH, logprobs=True),
               "r2": script("r2", token_ids, 3, FinishReason.LENGTH, logprobs=True)}
    texts = [tiny_tokenizer.decode([t]) for t in token_ids]

    async def main():
        async with serving(tiny_tokenizer, ReplayScheduler(scripts)) as (client, _):
            completion = await client.completions.create(
                model="served", prompt="x", logprobs=2, max_tokens=len(token_ids),
                extra_headers={"X-Request-Id": "r1"})
            chat = await client.chat.completions.create(
                model="served", messages=[{"role": "user", "content": "x"}], logprobs=True,
                top_logprobs=2, stream=True, extra_headers={"X-Request-Id": "r2"})
            chunks = [c async for c in chat]
            return completion, chunks

    completion, chunks = run(main())
    choice = completion.choices[0]
    assert choice.text == tiny_tokenizer.decode(token_ids)
    assert choice.logprobs.tokens == texts
    assert choice.logprobs.token_logprobs == pytest.approx([-0.5] * len(token_ids))
    # The chosen token and token 3 are the top two (the chosen one repeats among them).
    assert [set(top) for top in choice.logprobs.top_logprobs] == [
        {t, tiny_tokenizer.decode([3])} for t in texts]
    assert choice.logprobs.text_offset == [sum(len(t) for t in texts[:k])
                                           for k in range(len(texts))]
    content = [e for c in chunks if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]
    assert [e.token for e in content] == texts
    assert all(len(e.top_logprobs) == 2 and e.logprob == pytest.approx(-0.5) for e in content)
    assert content[0].bytes == list(texts[0].encode())


def test_batched_prompts_with_echo_and_n(tiny_tokenizer):
    first, second = tiny_tokenizer.encode(" one two"), tiny_tokenizer.encode(" three")
    scripts = {"b-0": script("b-0", first, 1, FinishReason.STOP, logprobs=False),
               "b-1": script("b-1", second, 1, FinishReason.LENGTH, logprobs=False)}

    async def main():
        async with serving(tiny_tokenizer, ReplayScheduler(scripts)) as (client, _):
            whole = await client.completions.create(
                model="m", prompt=["Hello", "World"], echo=True, max_tokens=8,
                extra_headers={"X-Request-Id": "b"})
            streamed = await client.completions.create(
                model="served", prompt=["Hello", "World"], max_tokens=8, stream=True,
                extra_headers={"X-Request-Id": "b"})
            chunks = [c async for c in streamed]
            return whole, chunks

    whole, chunks = run(main())
    assert [(c.index, c.text, c.finish_reason) for c in whole.choices] == [
        (0, "Hello" + tiny_tokenizer.decode(first), "stop"),
        (1, "World" + tiny_tokenizer.decode(second), "length")]
    assert whole.usage.completion_tokens == len(first) + len(second)
    for index, ids in ((0, first), (1, second)):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert "".join(c.text for c in mine) == tiny_tokenizer.decode(ids)
