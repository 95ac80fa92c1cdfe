"""End to end: client -> router -> scheduler -> 2 workers, real gRPC on loopback, real Redis.

The tests share one stack and run in file order; the last two restart the scheduler and
stop a worker.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gridllm.client import AsyncClient, Client
from gridllm.common.redis_keys import DEFAULT_KEYS as KEYS
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import generate_pb2
from tests.e2e.conftest import NUM_KV_BLOCKS, SERVED_MODEL_NAME
from tests.e2e.tiny_model import MAX_MODEL_LEN

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "café naïve 日本語 🙂",
    "Once upon a time there was a tiny model that served tokens over gRPC to every client.",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
# Thousands of steps (tens of seconds here): a cancel or deadline that did not abort the
# request upstream would leave its blocks held for longer than the tests wait.
ENDLESS = SamplingParams(temperature=0.0, max_tokens=3000, ignore_eos=True)
# Long enough that a scheduler kill lands mid-stream, short enough to compare with LLM.
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def all_blocks_free(client: Client) -> bool:
    stats = client.server_stats()
    return (stats.num_requests_running == 0 and stats.num_requests_waiting == 0
            and bool(stats.workers)
            and all(w.kv_blocks_free == w.kv_blocks_total for w in stats.workers if w.is_alive))


@pytest.fixture(scope="module")
def llm(tiny_served_model):
    from gridllm.llm import LLM

    return LLM(tiny_served_model, device="cpu", num_kv_blocks=64)


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.endpoint, timeout=60.0) as c:
        yield c


def stream_text(client: Client, prompt, params: SamplingParams, **kwargs):
    chunks = list(client.generate_stream(prompt, params, return_token_ids=True, **kwargs))
    return chunks, "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]


def test_greedy_stream_equals_llm_generate(client, llm):
    references = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, reference in zip(PROMPTS, references, strict=True):
        chunks, text, token_ids = stream_text(client, prompt, GREEDY)
        expected = reference.outputs[0]
        assert token_ids == expected.token_ids, prompt
        assert text == expected.text, prompt
        assert chunks[-1].finish_reason == expected.finish_reason
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert chunks[-1].usage.prompt_tokens == len(reference.prompt_token_ids)
        assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
        # The non-streaming convenience returns the same completion.
        assert client.generate(prompt, GREEDY).outputs[0].text == expected.text


def test_router_discovers_schedulers_from_redis(stack, llm, tiny_served_model, e2e_redis_url):
    """A second router given no --scheduler finds the stack's scheduler in the registry."""
    from router.server import RouterOptions, RouterServer

    async def main():
        router = RouterServer(RouterOptions(model=tiny_served_model, redis_url=e2e_redis_url))
        port = await router.start("127.0.0.1:0")
        try:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=60.0) as aclient:
                chunks = [c async for c in aclient.generate_stream(PROMPTS[0], GREEDY)]
            return "".join(c.text for c in chunks), [a.address for a in router.pool.links]
        finally:
            await router.stop()

    text, addresses = asyncio.run(main())
    assert text == llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].text
    assert len(addresses) == 1


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_strings_match_llm_and_abort_upstream(client, llm, include_stop):
    prompt = PROMPTS[1]
    free_text = llm.generate(prompt, GREEDY.clone(ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].text
    assert len(free_text) > 6
    # A stop string from the middle of the free-running completion must end it there; the
    # scheduler would otherwise run the request for thousands of steps.
    stop = free_text[3:5]
    params = ENDLESS.clone(stop=[stop], include_stop_str_in_output=include_stop)
    expected = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    chunks, text, _ = stream_text(client, prompt, params)
    assert text == expected.text
    assert chunks[-1].finish_reason == "stop" and chunks[-1].stop_reason == stop
    assert text.endswith(stop) == include_stop
    wait_until(lambda: all_blocks_free(client), 5.0, "the stopped request's blocks freed")


def test_n_seeded_completions_match_llm(client, llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10)
    expected = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    output = client.generate(PROMPTS[0], params)
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert [c.text for c in output.outputs] == [c.text for c in expected.outputs]


def test_chat_and_tokenize(client, llm):
    messages = [{"role": "user", "content": "Hello there"}]
    expected = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    output = client.generate(messages=messages, sampling_params=GREEDY)
    assert output.outputs[0].text == expected.outputs[0].text
    assert client.tokenize(messages=messages) == expected.prompt_token_ids
    assert client.tokenize("café") == llm.get_tokenizer().encode("café")
    info = client.model_info()
    assert (info.vocab_size, info.max_model_len, info.eos_token_id) == (320, MAX_MODEL_LEN, 1)


def test_settings_given_to_the_stack_reach_its_services(stack, client):
    # RouterOptions.served_model_name, CacheConfig.num_kv_blocks and
    # SchedulerServiceConfig.discovery_interval travel as the services' own flags.
    assert client.model_info().model == SERVED_MODEL_NAME
    workers = client.server_stats().workers
    assert len(workers) == 2 and {w.kv_blocks_total for w in workers} == {NUM_KV_BLOCKS}
    assert "--discovery-interval 0.3" in " ".join(stack.scheduler.argv)


def test_50_concurrent_streams_complete_and_free_every_block(stack, client):
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=12)

    async def run_all():
        async with AsyncClient(stack.endpoint, timeout=60.0) as aclient:
            async def one(i: int):
                # Distinct first blocks: no prefix affinity, so load spreads the requests.
                prompt = f"{i} is the number of this request. {PROMPTS[i % len(PROMPTS)]}"
                chunks = [c async for c in aclient.generate_stream(prompt, params)]
                return chunks[-1]
            return await asyncio.gather(*(one(i) for i in range(50)))

    finals = asyncio.run(asyncio.wait_for(run_all(), timeout=120))
    assert len(finals) == 50
    assert all(f.finish_reason in ("stop", "length") for f in finals)
    assert all(1 <= f.usage.completion_tokens <= 12 for f in finals)
    wait_until(lambda: all_blocks_free(client), 10.0, "every KV block free")
    # Both workers served some of them: each caches prompt blocks (mirrored to Redis).
    import redis

    stats = client.server_stats()
    assert len(stats.workers) == 2
    r = redis.Redis.from_url(stack.redis_url)
    try:
        counts = wait_until(
            lambda: (lambda c: c if all(c) else None)(
                [r.hlen(KEYS.kv_cached_key(w.worker_id)) for w in stats.workers]),
            5.0, "both workers to hold cached prompt blocks")
    finally:
        r.close()
    assert all(n > 0 for n in counts)


def test_cancelled_streams_free_their_blocks(stack, client):
    async def run():
        async with AsyncClient(stack.endpoint, timeout=60.0) as aclient:
            async def start_and_cancel(i: int) -> int:
                stream = aclient.generate_stream(f"{PROMPTS[3]} {i}", ENDLESS,
                                                 return_token_ids=True)
                received = 0
                async for chunk in stream:
                    received += len(chunk.token_ids)
                    assert chunk.finish_reason is None
                    if received >= 3:
                        break
                await stream.aclose()  # cancels the call
                return received
            return await asyncio.gather(*(start_and_cancel(i) for i in range(6)))

    received = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert all(n >= 3 for n in received)
    wait_until(lambda: all_blocks_free(client), 5.0, "cancelled requests' blocks freed")


def test_deadline_aborts_request_and_frees_blocks(client):
    with pytest.raises(grpc.RpcError) as info:
        for _ in client.generate_stream(PROMPTS[3], ENDLESS, timeout=0.5):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: all_blocks_free(client), 5.0, "blocks of the expired request freed")


def _raw_generate(channel: grpc.Channel):
    # Bytes in: lets a test send fields this proto does not know.
    return channel.unary_stream("/gridllm.v1.Generation/Generate",
                                request_serializer=lambda b: b,
                                response_deserializer=generate_pb2.GenerateResponse.FromString)


def _invalid_requests() -> list[tuple[str, bytes]]:
    sp = generate_pb2.SamplingParams
    cases = [("n", sp(n=0)), ("temperature", sp(temperature=-1)), ("top_p", sp(top_p=2.0)),
             ("top_k", sp(top_k=-5)), ("min_p", sp(min_p=-0.1)),
             ("presence_penalty", sp(presence_penalty=5)),
             ("frequency_penalty", sp(frequency_penalty=-5)),
             ("repetition_penalty", sp(repetition_penalty=0)), ("max_tokens", sp(max_tokens=0)),
             ("min_tokens", sp(min_tokens=-1)), ("logprobs", sp(logprobs=-2)),
             ("prompt_logprobs", sp(prompt_logprobs=-2)), ("stop", sp(stop=[""])),
             ("stop_token_ids", sp(stop_token_ids=[10_000])),
             ("allowed_token_ids", sp(allowed_token_ids=[-1])),
             ("logit_bias", sp(logit_bias={10_000: 1.0}))]
    out = [(f"sampling_params.{name}",
            generate_pb2.GenerateRequest(prompt="hi", sampling_params=params).SerializeToString())
           for name, params in cases]
    out.append(("prompt must not be empty", generate_pb2.GenerateRequest(prompt="")
                .SerializeToString()))
    out.append(("max_model_len", generate_pb2.GenerateRequest(
        prompt_token_ids=generate_pb2.TokenIds(ids=[5] * MAX_MODEL_LEN)).SerializeToString()))
    out.append(("prompt_token_ids", generate_pb2.GenerateRequest(
        prompt_token_ids=generate_pb2.TokenIds(ids=[5, 320])).SerializeToString()))
    message = generate_pb2.ChatMessage(role="user", content="hi").SerializeToString()
    message += bytes([(3 << 3) | 2, 3]) + b"bob"  # field 3: unknown to this proto
    chat = bytes([(1 << 3) | 2, len(message)]) + message
    out.append(("chat.messages[0] has unknown fields", bytes([(4 << 3) | 2, len(chat)]) + chat))
    return out


def test_invalid_requests_are_refused_without_disturbing_streams(stack, client, llm):
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    expected = llm.generate(PROMPTS[:2], params, use_tqdm=False)

    async def run():
        async with AsyncClient(stack.endpoint, timeout=60.0) as aclient:
            async def stream(prompt):
                return "".join([c.text async for c in aclient.generate_stream(prompt, params)])
            tasks = [asyncio.create_task(stream(p)) for p in PROMPTS[:2]]
            await asyncio.sleep(0.05)
            errors = []
            channel = grpc.aio.insecure_channel(stack.endpoint)
            try:
                call = channel.unary_stream(
                    "/gridllm.v1.Generation/Generate", request_serializer=lambda b: b,
                    response_deserializer=generate_pb2.GenerateResponse.FromString)
                for field, raw in _invalid_requests():
                    try:
                        async for _ in call(raw, timeout=10.0):
                            pass
                        errors.append((field, None, ""))
                    except grpc.aio.AioRpcError as exc:
                        errors.append((field, exc.code(), exc.details()))
            finally:
                await channel.close()
            return errors, await asyncio.gather(*tasks)

    errors, texts = asyncio.run(asyncio.wait_for(run(), timeout=60))
    for field, code, details in errors:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, code, details)
        assert field in details, (field, details)
    assert texts == [e.outputs[0].text for e in expected]


def test_scheduler_restart_resubmits_and_keeps_prefix_cache(stack, client, llm):
    cached_prompt = " ".join(PROMPTS)  # several full KV blocks
    first = client.generate(cached_prompt, GREEDY)
    assert first.outputs[0].finish_reason is not None
    time.sleep(0.5)  # the Redis mirror is written behind the step loop
    expected = llm.generate(PROMPTS[2], LONG, use_tqdm=False)[0].outputs[0]

    text, token_ids, killed = "", [], False
    for chunk in client.generate_stream(PROMPTS[2], LONG, return_token_ids=True, timeout=90):
        text += chunk.text
        token_ids += chunk.token_ids
        if not killed and len(token_ids) >= 5:
            stack.scheduler.kill()
            stack.start_scheduler(wait=True)
            killed = True
    assert killed
    # The router resubmitted prompt + tokens so far; greedy makes the result identical.
    assert token_ids == expected.token_ids
    assert text == expected.text
    with open(stack.router.log_path) as log:
        assert "resubmitting" in log.read()

    wait_until(lambda: client.server_stats().num_workers_alive == 2, 20.0, "workers relinked")
    again = client.generate(cached_prompt, GREEDY)
    assert again.outputs[0].text == first.outputs[0].text
    assert again.num_cached_tokens >= 16, "prefix cached before the restart was not hit"
    assert client.server_stats().prefix_cache_hits > 0


def test_stopping_one_worker_leaves_the_other_serving(stack, client, llm):
    assert client.server_stats().num_workers_alive == 2
    stack.workers[0].stop(grace_s=5.0)
    wait_until(lambda: client.server_stats().num_workers_alive == 1, 20.0,
               "the stopped worker to leave")
    expected = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, reference in zip(PROMPTS, expected, strict=True):
        assert client.generate(prompt, GREEDY).outputs[0].text == reference.outputs[0].text
    wait_until(lambda: all_blocks_free(client), 10.0, "every block free on the survivor")
