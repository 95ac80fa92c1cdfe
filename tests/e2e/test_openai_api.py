"""The OpenAI-compatible HTTP API of a live stack (router, scheduler, one worker, Redis on
loopback), through the official ``openai`` client, sync and async.

Greedy text is compared with ``LLM.generate`` / ``LLM.chat`` on the same tiny model; the
router's, scheduler's and worker's ``/metrics`` are scraped around a known workload; the
services log JSON lines, in which one request's id is followed through all three.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request

import pytest

from gridllm.client import Client
from gridllm.common.sampling_params import SamplingParams
from gridllm.launcher import LocalStack
from tests.e2e.conftest import SERVED_MODEL_NAME, stack_config
from tests.e2e.stack_checks import all_blocks_free, wait_until

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "café naïve 日本語 🙂"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
# Runs for thousands of steps unless its client's disconnect aborts it.
ENDLESS_BODY = {"ignore_eos": True}


@pytest.fixture(scope="module")
def http_stack(tiny_served_model, e2e_redis_url, tmp_path_factory):
    config = stack_config(tiny_served_model, e2e_redis_url,
                          str(tmp_path_factory.mktemp("http-stack-logs")), num_workers=1,
                          http_port=0, scheduler_metrics_port=0, worker_metrics_port=0,
                          env={"GRIDLLM_LOGGING_LEVEL": "INFO", "GRIDLLM_LOG_FORMAT": "json"})
    with LocalStack(config) as stack:
        yield stack


@pytest.fixture(scope="module")
def oai(http_stack):
    with openai.OpenAI(base_url=http_stack.http_endpoint + "/v1", api_key="unused",
                       max_retries=0, timeout=60.0) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(http_stack):
    with Client(http_stack.endpoint, timeout=60.0) as client:
        yield client


@pytest.fixture(scope="module")
def llm(tiny_served_model):
    from gridllm.llm import LLM

    return LLM(tiny_served_model, device="cpu", num_kv_blocks=64)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_models_health_and_ready(http_stack, oai):
    assert [m.id for m in oai.models.list().data] == [SERVED_MODEL_NAME]
    assert get(http_stack.http_endpoint + "/health")[0] == 200
    assert get(http_stack.http_endpoint + "/ready") == (200, '{"status":"ready"}')


def test_greedy_completions_equal_llm_generate_streamed_or_not(oai, llm):
    references = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, reference in zip(PROMPTS, references, strict=True):
        expected = reference.outputs[0]
        answer = oai.completions.create(model=SERVED_MODEL_NAME, prompt=prompt, max_tokens=16,
                                        temperature=0)
        assert answer.choices[0].text == expected.text
        assert answer.choices[0].finish_reason == expected.finish_reason
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
            len(reference.prompt_token_ids), len(expected.token_ids))
        chunks = list(oai.completions.create(model=SERVED_MODEL_NAME, prompt=prompt,
                                             max_tokens=16, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected.text
        assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_chat_streamed_with_usage_equals_llm_chat(oai, llm):
    messages = [{"role": "user", "content": "Hello there"}]
    expected = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    answer = oai.chat.completions.create(model=SERVED_MODEL_NAME, messages=messages,
                                         max_completion_tokens=16, temperature=0)
    assert answer.choices[0].message.content == expected.outputs[0].text
    assert answer.choices[0].message.role == "assistant"
    chunks = list(oai.chat.completions.create(
        model=SERVED_MODEL_NAME, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == \
        expected.outputs[0].text
    # The last chunk carries the usage and no choices; the others carry none.
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (
        answer.usage.prompt_tokens, answer.usage.completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == expected.outputs[0].finish_reason
    assert answer.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_n2_seeded_sampling_repeats_and_matches_llm(oai, llm):
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=12)
    expected = [c.text for c in llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs]
    answers = [oai.completions.create(model=SERVED_MODEL_NAME, prompt=PROMPTS[1], n=2,
                                      seed=11, temperature=1.0, max_tokens=12)
               for _ in range(2)]
    for answer in answers:
        assert [c.index for c in answer.choices] == [0, 1]
        assert [c.text for c in answer.choices] == expected
    assert answers[0].usage.completion_tokens == sum(
        len(c.token_ids) for c in llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs)


def test_async_client_streams_concurrently(http_stack, llm):
    expected = [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]

    async def run():
        async with openai.AsyncOpenAI(base_url=http_stack.http_endpoint + "/v1",
                                      api_key="unused", max_retries=0) as client:
            async def one(prompt: str) -> str:
                stream = await client.completions.create(
                    model=SERVED_MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0,
                    stream=True)
                return "".join([c.choices[0].text async for c in stream])
            return await asyncio.gather(*(one(p) for p in PROMPTS))

    assert asyncio.run(asyncio.wait_for(run(), 60)) == expected


@pytest.mark.parametrize("changes, param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"), ({"temperature": "hot"}, "temperature"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"), ({"prompt": ""}, "prompt"),
    ({"stop": [""]}, "stop"), ({"logprobs": 50}, "logprobs"),
])
def test_bad_completion_parameters_are_400_naming_the_field(oai, changes, param):
    body = {"model": SERVED_MODEL_NAME, "prompt": "Hello", "max_tokens": 4, **changes}
    with pytest.raises(openai.BadRequestError) as error:
        oai.completions.create(**body)
    assert error.value.status_code == 400
    assert error.value.body["param"] == param and param in error.value.body["message"]


def test_bad_chat_and_unknown_model(oai):
    with pytest.raises(openai.BadRequestError) as error:
        oai.chat.completions.create(model=SERVED_MODEL_NAME, messages=[])
    assert error.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as error:
        oai.chat.completions.create(model=SERVED_MODEL_NAME, messages=[
            {"role": "user", "content": "hi"}], logprobs=True, top_logprobs=99)
    assert error.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.NotFoundError) as error:
        oai.completions.create(model="no-such-model", prompt="Hello")
    assert error.value.status_code == 404 and error.value.body["param"] == "model"


def test_disconnect_mid_stream_frees_every_block(oai, grpc_client):
    stream = oai.completions.create(model=SERVED_MODEL_NAME, prompt=PROMPTS[0],
                                    max_tokens=3000, temperature=0, stream=True,
                                    extra_body=ENDLESS_BODY)
    received = 0
    for chunk in stream:
        received += 1
        assert chunk.choices[0].finish_reason is None
        if received == 3:
            break
    assert grpc_client.server_stats().num_requests_running == 1
    stream.close()  # the client goes away mid-stream
    wait_until(lambda: all_blocks_free(grpc_client), 5.0, "every KV block free")


def test_tokenize_and_detokenize_round_trip(http_stack, llm):
    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(http_stack.http_endpoint + path,
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    ids = post("/tokenize", {"prompt": "café naïve"})["tokens"]
    assert ids == llm.get_tokenizer().encode("café naïve")
    assert post("/detokenize", {"tokens": ids})["prompt"] == llm.get_tokenizer().decode(ids)


# ------------------------------------------------------------------------- metrics
def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page, keyed by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = get(url)
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def moved(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_a_known_workload_exactly(http_stack, oai):
    router_url = http_stack.http_endpoint + "/metrics"
    scheduler_url = f"http://127.0.0.1:{http_stack.metrics_ports['scheduler']}/metrics"
    worker_url = f"http://127.0.0.1:{http_stack.metrics_ports['worker-1']}/metrics"
    urls = (router_url, scheduler_url, worker_url)
    before = [scrape(url) for url in urls]
    num_requests, max_tokens = 4, 7
    num_prompt_tokens = 0
    for i in range(num_requests):
        answer = oai.completions.create(model=SERVED_MODEL_NAME, prompt=f"{i} {PROMPTS[1]}",
                                        max_tokens=max_tokens, temperature=0,
                                        extra_body=ENDLESS_BODY)
        assert answer.usage.completion_tokens == max_tokens
        num_prompt_tokens += answer.usage.prompt_tokens
    router, scheduler, worker = (scrape(url) for url in urls)
    r0, s0, w0 = before
    assert moved(r0, router, "gridllm:request_success_total", finished_reason="length") == \
        num_requests
    assert moved(r0, router, "gridllm:generation_tokens_total") == num_requests * max_tokens
    assert moved(r0, router, "gridllm:prompt_tokens_total") == num_prompt_tokens
    assert moved(r0, router, "gridllm:time_to_first_token_seconds_count") == num_requests
    assert moved(r0, router, "gridllm:e2e_request_latency_seconds_count") == num_requests
    assert moved(r0, router, "gridllm:inter_token_latency_seconds_count") == \
        num_requests * (max_tokens - 1)
    assert moved(r0, router, "gridllm:http_requests_total", route="/v1/completions",
                 status="200") == num_requests
    for name in ("queue_time", "prefill_time", "decode_time", "inference_time"):
        assert moved(s0, scheduler, f"gridllm:request_{name}_seconds_count") == num_requests
    # Every prompt token once (distinct first blocks: no prefix-cache hits) and every decode;
    # a request finishing at step N may hold one wasted slot at N + 1 (pipelined steps).
    computed = num_prompt_tokens + num_requests * (max_tokens - 1)
    assert computed <= moved(s0, scheduler, "gridllm:iteration_tokens_total_sum") <= \
        computed + num_requests
    worker_id = next(dict(k[1])["worker_id"] for k in scheduler
                     if k[0] == "gridllm:num_requests_running")
    assert scheduler[("gridllm:num_requests_running", (("worker_id", worker_id),))] == 0
    assert scheduler[("gridllm:kv_cache_usage_perc", (("worker_id", worker_id),))] == 0
    assert moved(w0, worker, "gridllm:worker_requests_total") == num_requests
    infos = [dict(labels) for (name, labels), value in worker.items()
             if name == "gridllm:worker_model_info" and value == 1]
    assert len(infos) == 1 and infos[0]["quantization"] == "" and infos[0]["device"] == "cpu"
    assert infos[0]["kv_cache_dtype"] == infos[0]["dtype"] != ""
    assert infos[0]["kv_cache_scales"] == ""
    num_steps = moved(w0, worker, "gridllm:worker_steps_total")
    assert moved(w0, worker, "gridllm:worker_step_time_seconds_count") == num_steps > 0
    assert moved(s0, scheduler, "gridllm:scheduler_step_round_trip_seconds_count",
                 worker_id=worker_id) >= num_requests * max_tokens


# ------------------------------------------------------------------------- logs
def json_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_json_logs_follow_one_request_through_every_service(http_stack, oai):
    request_id = "trace-me-0123"
    oai.completions.create(model=SERVED_MODEL_NAME, prompt=PROMPTS[0], max_tokens=4,
                           temperature=0, extra_headers={"X-Request-Id": request_id})
    paths = {name: os.path.join(http_stack.log_dir, f"{name}.log")
             for name in ("router", "scheduler", "worker-1")}

    def seen_everywhere() -> bool:
        return all(any(e.get("request_id") == request_id for e in json_lines(path))
                   for path in paths.values())

    wait_until(seen_everywhere, 5.0, "the request id in every service's log")
    access = [e for e in json_lines(paths["router"])
              if e["logger"] == "router.access" and e.get("request_id") == request_id]
    assert len(access) == 1
    line = access[0]
    assert (line["status"], line["protocol"], line["finish_reason"]) == ("200", "http",
                                                                         "length")
    assert line["completion_tokens"] == 4 and line["prompt_tokens"] > 0
    assert 0 < line["ttft_ms"] <= line["total_ms"]


# ------------------------------------------------------------------------- structured outputs
CITY_SCHEMA = {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Rome", "Oslo"]}, "sunny": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["warm", "cold"]}, "maxItems": 2}},
    "required": ["city", "sunny", "tags"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
# Random weights fill any whitespace the grammar allows: compact JSON ends.
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}


def test_response_format_json_schema(oai):
    jsonschema = pytest.importorskip("jsonschema")
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "weather", "schema": CITY_SCHEMA}}
    messages = [{"role": "user", "content": "Weather as JSON"}]
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
        answer = oai.chat.completions.create(
            model=SERVED_MODEL_NAME, messages=messages, response_format=response_format,
            temperature=temperature, seed=seed, max_tokens=200, extra_body=COMPACT)
        choice = answer.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), CITY_SCHEMA)
    chunks = list(oai.chat.completions.create(
        model=SERVED_MODEL_NAME, messages=messages, response_format=response_format,
        temperature=0, max_tokens=200, stream=True, extra_body=COMPACT))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), CITY_SCHEMA)


def test_forced_tool_calls(oai):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = oai.chat.completions.create(
        model=SERVED_MODEL_NAME, messages=messages, tools=[WEATHER_TOOL], max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, extra_body=COMPACT)
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.type == "function"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    required = oai.chat.completions.create(
        model=SERVED_MODEL_NAME, messages=messages, tools=[WEATHER_TOOL], max_tokens=200,
        tool_choice="required", temperature=1.0, seed=3, extra_body=COMPACT)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name == "get_weather"
        assert set(json.loads(call.function.arguments)) == {"city"}


def test_a_grammar_the_worker_cannot_compile_is_400(oai):
    with pytest.raises(openai.BadRequestError) as error:
        oai.completions.create(model=SERVED_MODEL_NAME, prompt="Hello", max_tokens=4,
                               extra_body={"guided_regex": "(unclosed"})
    assert "structured_outputs.regex does not compile" in error.value.body["message"]
    # The worker serves on.
    answer = oai.completions.create(model=SERVED_MODEL_NAME, prompt="Hello", max_tokens=4,
                                    extra_body={"guided_choice": ["yes", "no"]})
    assert answer.choices[0].text in ("yes", "no")
