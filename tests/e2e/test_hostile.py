"""Hostile input against a real stack (Redis, scheduler, one worker, router; loopback).

Beside every hostile request a canary stream runs again and again; each of its runs must be
byte-identical to its undisturbed run. Afterwards every process is alive and every KV block
free. Then a load of 1,000 concurrent streams: each completes or is refused with
RESOURCE_EXHAUSTED past the scheduler's admission limit, and the services' memory stays
bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridllm.client import AsyncClient, Client
from gridllm.common.config import CacheConfig, SchedulerConfig
from gridllm.common.grpc_utils import RETRY_AFTER_KEY
from gridllm.common.sampling_params import SamplingParams
from gridllm.launcher import LocalStack, StackConfig
from gridllm.v1 import generate_pb2
from router.server import RouterOptions
from scheduler_svc.server import SchedulerServiceConfig
from tests.e2e.hostile_requests import MAX_MODEL_LEN, generate_requests
from tests.e2e.stack_checks import Canary, all_blocks_free, wait_until

pytestmark = pytest.mark.slow

# Room for every running request of the load test (two blocks each).
NUM_KV_BLOCKS = 640
MAX_NUM_SEQS = 64
# Well below the load's 1,000 streams: the admission limit is reached and answers.
MAX_NUM_QUEUED_REQS = 200
NUM_LOAD_STREAMS = 1000
NUM_FUZZ_CASES = 250
NUM_RAW_CASES = 100
# A fuzz case reads this many messages of an accepted stream, then cancels it.
NUM_MESSAGES_READ = 3
CASE_TIMEOUT_S = 30.0
ACCEPTED = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
CANARY_PROMPT = "Once upon a time there was a tiny model that served tokens over gRPC."
CANARY_PARAMS = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
# Generous bounds on how much the router's and the scheduler's memory may grow under load.
MAX_ROUTER_GROWTH = 512 << 20
MAX_SCHEDULER_GROWTH = 256 << 20


@pytest.fixture(scope="module")
def hostile_stack(tiny_served_model, redis_server, tmp_path_factory):
    import redis

    url = redis_server.rsplit("/", 1)[0] + "/10"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    config = StackConfig(
        model=tiny_served_model, num_workers=1, port=0, redis_url=url,
        log_dir=str(tmp_path_factory.mktemp("hostile-logs")), startup_timeout_s=120.0,
        stop_grace_s=5.0, cache_config=CacheConfig(num_kv_blocks=NUM_KV_BLOCKS),
        scheduler_options=SchedulerServiceConfig(
            discovery_interval=0.3, max_num_queued_reqs=MAX_NUM_QUEUED_REQS,
            scheduler_config=SchedulerConfig(max_num_seqs=MAX_NUM_SEQS)),
        router_options=RouterOptions(model=tiny_served_model))
    stack = LocalStack(config)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client(hostile_stack):
    with Client(hostile_stack.endpoint, timeout=60.0) as c:
        yield c


def canary_once(client: Client) -> tuple[str, list[int]]:
    chunks = list(client.generate_stream(CANARY_PROMPT, CANARY_PARAMS, return_token_ids=True))
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]


def grpc_canary(target: str, expected: tuple[str, list[int]]) -> Canary:
    """The canary request again and again over gRPC, each run compared with ``expected``."""
    return Canary(Client(target, timeout=60.0), canary_once, expected, grpc.RpcError)


@pytest.fixture(scope="module")
def undisturbed(client):
    """The canary's output with nothing else running."""
    return canary_once(client)


def _raw_call(channel: grpc.Channel):
    return channel.unary_stream("/gridllm.v1.Generation/Generate",
                                request_serializer=lambda b: b,
                                response_deserializer=generate_pb2.GenerateResponse.FromString)


def send(call, raw: bytes) -> tuple[str, str]:
    """One request: (status code name, details); an accepted stream is read for a few
    messages and then cancelled (OK)."""
    stream = call(raw, timeout=CASE_TIMEOUT_S)
    num_read = 0
    try:
        for _ in stream:
            num_read += 1
            if num_read >= NUM_MESSAGES_READ:
                stream.cancel()
                return "OK", ""
        return "OK", ""
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED and num_read >= NUM_MESSAGES_READ:
            return "OK", ""
        return err.code().name, err.details() or ""


def _processes_alive(stack: LocalStack) -> list[str]:
    return [p.name for p in stack.processes if not p.is_alive()]


def test_fuzzed_requests_get_only_ok_or_a_refusal_beside_an_identical_canary(
        hostile_stack, client, undisturbed):
    outcomes: Counter[str] = Counter()
    channel = grpc.insecure_channel(hostile_stack.endpoint, options=[
        ("grpc.max_send_message_length", 64 << 20)])
    call = _raw_call(channel)

    @settings(max_examples=NUM_FUZZ_CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(generate_requests())
    def fuzz_one(request: generate_pb2.GenerateRequest) -> None:
        code, details = send(call, request.SerializeToString())
        outcomes[code] += 1
        assert code in ACCEPTED, (code, details, str(request)[:2000])

    @settings(max_examples=NUM_RAW_CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=300))
    def fuzz_raw(raw: bytes) -> None:
        code, details = send(call, raw)
        outcomes[f"raw {code}"] += 1
        assert code in ACCEPTED, (code, details, raw)

    try:
        with grpc_canary(hostile_stack.endpoint, undisturbed) as canary:
            fuzz_one()
            fuzz_raw()
            # The canary ran beside the fuzz cases (its last run may end after them).
            wait_until(lambda: canary.num_runs >= 2, 120.0, "two canary runs")
    finally:
        channel.close()
        print(f"fuzz outcomes: {dict(outcomes)}; canary runs: {canary.num_runs}")
    assert not canary.failures, canary.failures[:3]
    assert sum(outcomes.values()) >= NUM_FUZZ_CASES + NUM_RAW_CASES
    assert outcomes["OK"] and outcomes["INVALID_ARGUMENT"]
    assert not _processes_alive(hostile_stack)
    wait_until(lambda: all_blocks_free(client), 30.0, "every KV block free after the fuzz")


def _request(prompt=None, **kwargs) -> generate_pb2.GenerateRequest:
    params = kwargs.pop("sampling_params", None)
    request = generate_pb2.GenerateRequest(**kwargs)
    if prompt is not None:
        request.prompt = prompt
    if params is not None:
        request.sampling_params.CopyFrom(params)
    return request


SP = generate_pb2.SamplingParams
# Requests that once took a process down or stalled every stream: (what, request bytes,
# expected code, a word the details must hold).
KNOWN_HOSTILE = [
    ("n=2147483647", _request("hi", sampling_params=SP(n=2147483647)), "INVALID_ARGUMENT",
     "sampling_params.n"),
    ("n=100000", _request("hi", sampling_params=SP(n=100000)), "INVALID_ARGUMENT",
     "sampling_params.n"),
    ("prompt_logprobs=49152, 200-token prompt", _request(
        prompt_token_ids=generate_pb2.TokenIds(ids=[7] * 200),
        sampling_params=SP(prompt_logprobs=49152)), "INVALID_ARGUMENT",
     "sampling_params.prompt_logprobs"),
    ("max_tokens past the context", _request(
        prompt_token_ids=generate_pb2.TokenIds(ids=[7] * 200),
        sampling_params=SP(max_tokens=MAX_MODEL_LEN)), "INVALID_ARGUMENT",
     "sampling_params.max_tokens"),
    ("a 10 MB prompt", _request("a" * (10 << 20)), "INVALID_ARGUMENT", "prompt has"),
    ("a 60 MB prompt", _request("a" * (60 << 20)), "RESOURCE_EXHAUSTED", "larger than max"),
    ("a 5 MB chat", _request(chat=generate_pb2.ChatMessages(messages=[
        generate_pb2.ChatMessage(role="user", content="b" * (5 << 20))])),
     "INVALID_ARGUMENT", "chat.messages"),
]


def test_requests_that_once_took_a_process_down_are_refused_at_once(
        hostile_stack, client, undisturbed):
    router = psutil.Process(hostile_stack.router.pid)
    rss_before = router.memory_info().rss
    results = []
    with grpc.insecure_channel(hostile_stack.endpoint, options=[
            ("grpc.max_send_message_length", 128 << 20)]) as channel:
        call = _raw_call(channel)
        with grpc_canary(hostile_stack.endpoint, undisturbed) as canary:
            for what, request, _, _ in KNOWN_HOSTILE:
                start = time.perf_counter()
                code, details = send(call, request.SerializeToString())
                results.append((what, code, details, time.perf_counter() - start))
            wait_until(lambda: canary.num_runs >= 1, 120.0, "a canary run")
        # Garbage bytes: INVALID_ARGUMENT, not UNKNOWN.
        garbage = send(call, b"\xff\xfe\x00garbage")
    rss_growth = router.memory_info().rss - rss_before
    for (what, code, details, seconds), (_, _, want, word) in zip(results, KNOWN_HOSTILE,
                                                                strict=True):
        assert code == want and word in details, (what, code, details)
        assert seconds < 10.0, (what, seconds)
    assert garbage[0] == "INVALID_ARGUMENT" and "could not be parsed" in garbage[1]
    assert not canary.failures, canary.failures[:3]
    assert rss_growth < 512 << 20, rss_growth
    assert not _processes_alive(hostile_stack)


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_the_scheduler_never_loads_torch(hostile_stack, client):
    # A request naming a logits processor (checked by name on the scheduler, run on the worker).
    params = SamplingParams(temperature=0.0, max_tokens=4, logits_processors=["no_repeat_ngram"],
                            extra_args={"no_repeat_ngram_size": 2})
    assert client.generate("Hello world", params).outputs[0].finish_reason == "length"
    assert "libtorch" not in _maps(hostile_stack.scheduler.pid)
    assert "libtorch" in _maps(hostile_stack.workers[0].pid)  # the check can see torch


def test_client_generate_returns_the_streams_usage(client):
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)
    chunks = list(client.generate_stream(CANARY_PROMPT, params))
    finals = [c.usage for c in chunks if c.usage is not None]
    output = client.generate(CANARY_PROMPT, params)
    assert output.usage.prompt_tokens == finals[0].prompt_tokens > 0
    assert output.usage.completion_tokens == sum(u.completion_tokens for u in finals) == 12
    assert output.usage.cached_tokens == max(u.cached_tokens for u in finals)


def test_1000_concurrent_streams_complete_or_are_refused_past_the_admission_limit(
        hostile_stack, client):
    processes = {"router": psutil.Process(hostile_stack.router.pid),
                 "scheduler": psutil.Process(hostile_stack.scheduler.pid)}
    baseline = {name: p.memory_info().rss for name, p in processes.items()}
    peak = dict(baseline)
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=8)

    async def one(aclient: AsyncClient, i: int):
        start = time.perf_counter()
        first = None
        try:
            async for chunk in aclient.generate_stream(
                    f"{i} is the number of this request. Hello world", params):
                first = first or time.perf_counter() - start
                final = chunk
            return "OK", final.finish_reason, first, ""
        except grpc.aio.AioRpcError as err:
            retry = dict(err.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
            return err.code().name, retry, None, err.details()

    async def run_all():
        async with AsyncClient(hostile_stack.endpoint, timeout=120.0) as aclient:
            task = asyncio.gather(*(one(aclient, i) for i in range(NUM_LOAD_STREAMS)))
            while not task.done():
                for name, process in processes.items():
                    peak[name] = max(peak[name], process.memory_info().rss)
                await asyncio.sleep(0.1)
            return await task

    start = time.perf_counter()
    results = asyncio.run(asyncio.wait_for(run_all(), timeout=300))
    seconds = time.perf_counter() - start
    codes = Counter(r[0] for r in results)
    first_token_s = sorted(r[2] for r in results if r[0] == "OK")
    p99 = first_token_s[int(0.99 * (len(first_token_s) - 1))]
    print(f"{NUM_LOAD_STREAMS} streams in {seconds:.1f}s: {dict(codes)}; first token p99 "
          f"{p99:.2f}s; peak RSS router {peak['router'] >> 20} MiB, scheduler "
          f"{peak['scheduler'] >> 20} MiB (baseline {baseline['router'] >> 20}, "
          f"{baseline['scheduler'] >> 20})")
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["OK"] >= MAX_NUM_QUEUED_REQS
    assert all(r[1] in ("stop", "length") for r in results if r[0] == "OK")
    for _, retry, _, details in (r for r in results if r[0] == "RESOURCE_EXHAUSTED"):
        assert retry is not None and f"max_num_queued_reqs={MAX_NUM_QUEUED_REQS}" in details
    assert peak["router"] - baseline["router"] < MAX_ROUTER_GROWTH
    assert peak["scheduler"] - baseline["scheduler"] < MAX_SCHEDULER_GROWTH
    wait_until(lambda: all_blocks_free(client), 30.0, "every KV block free after the load")
    assert not _processes_alive(hostile_stack)


def test_settings_reach_the_scheduler(hostile_stack):
    argv = " ".join(hostile_stack.scheduler.argv)
    assert f"--max-num-queued-reqs {MAX_NUM_QUEUED_REQS}" in argv
    assert f"--max-num-seqs {MAX_NUM_SEQS}" in argv
