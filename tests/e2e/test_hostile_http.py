"""Hostile input against the OpenAI-compatible HTTP API of a real stack (Redis, scheduler, one
worker, router; loopback).

Fuzzed bodies for every POST endpoint, and bodies that are not JSON objects, each answered
with 200 or a refusal (400, 404 for an unknown model, 413, 429), never a server error or a
hang, while a canary completion streams again and again through the official ``openai``
client, each run identical to its undisturbed one. Bodies past ``max_request_bytes`` get 413
before they are read, whether their length is declared or they come in chunks. Afterwards
every process is alive and every KV block free.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
from collections import Counter

import psutil
import pytest
from hypothesis import HealthCheck, given, settings

from gridllm.client import Client
from gridllm.common.config import ModelConfig
from gridllm.launcher import LocalStack
from router.server import RouterOptions
from tests.e2e.conftest import SERVED_MODEL_NAME, stack_config
from tests.e2e.hostile_http import http_requests, raw_bodies
from tests.e2e.stack_checks import Canary, all_blocks_free, wait_until

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

NUM_FUZZ_CASES = 300
NUM_RAW_CASES = 60
# The router's limit on a body (its default is larger; small here, so the oversized
# bodies below stay cheap to send).
MAX_REQUEST_BYTES = 4 << 20
# The served context, shorter than the tiny model's own: a request that leaves its length to
# the default (a chat's: the rest of the context) ends in seconds even on a loaded machine.
MAX_MODEL_LEN = 512
CASE_TIMEOUT_S = 60.0
# An accepted stream is read for this many lines, then the connection is closed.
NUM_LINES_READ = 3
ACCEPTED = (200, 400, 404, 413, 429)
CANARY_PROMPT = "Once upon a time there was a tiny model that served tokens over HTTP."
# Generous: a hostile request may leave garbage for the collector, never a leak this size.
MAX_ROUTER_GROWTH = 256 << 20


@pytest.fixture(scope="module")
def stack(tiny_served_model, redis_server, tmp_path_factory):
    import redis

    url = redis_server.rsplit("/", 1)[0] + "/11"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    config = stack_config(
        tiny_served_model, url, str(tmp_path_factory.mktemp("hostile-http-logs")),
        num_workers=1, http_port=0,
        model_config=ModelConfig(model=tiny_served_model, max_model_len=MAX_MODEL_LEN),
        router_options=RouterOptions(model=tiny_served_model,
                                     served_model_name=SERVED_MODEL_NAME,
                                     max_request_bytes=MAX_REQUEST_BYTES))
    with LocalStack(config) as stack:
        yield stack


@pytest.fixture(scope="module")
def address(stack) -> tuple[str, int]:
    host, port = stack.http_endpoint.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@pytest.fixture(scope="module")
def grpc_client(stack):
    with Client(stack.endpoint, timeout=60.0) as client:
        yield client


def canary_once(oai) -> str:
    stream = oai.completions.create(model=SERVED_MODEL_NAME, prompt=CANARY_PROMPT,
                                    max_tokens=48, temperature=0.0, stream=True,
                                    extra_body={"ignore_eos": True})
    return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


def post(address: tuple[str, int], path: str, body: bytes) -> tuple[int, str]:
    """One request: (status, the answer); a 200 stream is read for a few lines and then the
    connection closed."""
    conn = http.client.HTTPConnection(*address, timeout=CASE_TIMEOUT_S)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.getheader("content-type", "").startswith("text/event-stream"):
            lines = [response.readline() for _ in range(NUM_LINES_READ)]
            return response.status, b"".join(lines).decode(errors="replace")
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def undisturbed(stack):
    with openai.OpenAI(base_url=stack.http_endpoint + "/v1", api_key="unused",
                       max_retries=0, timeout=60.0) as oai:
        return canary_once(oai)


def test_fuzzed_bodies_get_only_ok_or_a_refusal_beside_an_identical_canary(
        stack, address, grpc_client, undisturbed):
    outcomes: Counter[str] = Counter()
    router = psutil.Process(stack.router.pid)
    rss_before = router.memory_info().rss

    @settings(max_examples=NUM_FUZZ_CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(http_requests(SERVED_MODEL_NAME))
    def fuzz_one(request: tuple[str, bytes]) -> None:
        path, body = request
        status, answer = post(address, path, body)
        outcomes[f"{path} {status}"] += 1
        assert status in ACCEPTED, (path, status, answer[:300], body[:2000])

    @settings(max_examples=NUM_RAW_CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(raw_bodies)
    def fuzz_raw(body: bytes) -> None:
        status, answer = post(address, "/v1/chat/completions", body)
        outcomes[f"raw {status}"] += 1
        assert status == 400, (status, answer[:300], body)
        assert json.loads(answer)["error"]["type"] == "invalid_request_error"

    canary = Canary(openai.OpenAI(base_url=stack.http_endpoint + "/v1", api_key="unused",
                                  max_retries=0, timeout=60.0),
                    canary_once, undisturbed, openai.APIError)
    try:
        with canary:
            fuzz_one()
            fuzz_raw()
            wait_until(lambda: canary.num_runs >= 2, 120.0, "two canary runs")
    finally:
        print(f"fuzz outcomes: {dict(outcomes)}; canary runs: {canary.num_runs}")
    assert not canary.failures, canary.failures[:3]
    assert sum(outcomes.values()) >= NUM_FUZZ_CASES + NUM_RAW_CASES
    # Both kinds of answer came, from both generating endpoints.
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert outcomes[f"{path} 200"] and outcomes[f"{path} 400"], outcomes
    assert not [p.name for p in stack.processes if not p.is_alive()]
    wait_until(lambda: all_blocks_free(grpc_client), 30.0, "every KV block free after the fuzz")
    assert router.memory_info().rss - rss_before < MAX_ROUTER_GROWTH


def _send_head(address: tuple[str, int], head: str) -> socket.socket:
    sock = socket.create_connection(address, timeout=CASE_TIMEOUT_S)
    sock.sendall(head.encode())
    return sock


def _read_answer(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the HTTP answer on ``sock`` (read to its end)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")]
        if length and len(rest) >= length[0]:
            break
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest)


def _send_until_answered(sock: socket.socket, chunks, total: int) -> int:
    """Sends ``chunks`` until the server answers (or closes): the bytes sent by then."""
    sent = 0
    for chunk in chunks:
        if select.select([sock], [], [], 0)[0]:
            break
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
        if sent >= total:
            break
    return sent


def _check_too_large(status: int, answer: dict) -> None:
    assert status == 413, (status, answer)
    error = answer["error"]
    assert error["code"] == "request_too_large"
    assert "max_request_bytes" in error["message"] and str(MAX_REQUEST_BYTES) in error["message"]


def test_a_body_past_the_limit_is_413_before_it_is_read(stack, address, grpc_client):
    router = psutil.Process(stack.router.pid)
    rss_before = router.memory_info().rss
    declared = 1 << 30
    piece = b"a" * (1 << 20)
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        # A declared length past the limit: answered at once, nothing of the body read.
        sock = _send_head(address, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                   f"application/json\r\nContent-Length: {declared}\r\n\r\n")
        with sock:
            sent = _send_until_answered(sock, (piece for _ in range(64)), declared)
            _check_too_large(*_read_answer(sock))
        assert sent < declared
    # No declared length (chunked): read up to the limit, then refused.
    total = 16 * MAX_REQUEST_BYTES
    sock = _send_head(address, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                               "application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    with sock:
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        sent = _send_until_answered(sock, (chunk for _ in range(total // len(piece))), total)
        _check_too_large(*_read_answer(sock))
    assert sent < total
    assert router.memory_info().rss - rss_before < 8 * MAX_REQUEST_BYTES


def test_a_body_at_the_limit_is_read_and_one_past_it_is_not(stack, address):
    # Padding inside the JSON object (white space) sizes the body exactly.
    request = json.dumps({"model": SERVED_MODEL_NAME, "prompt": "Hello", "max_tokens": 2,
                          "temperature": 0.0}).encode()
    at_limit = request[:-1] + b" " * (MAX_REQUEST_BYTES - len(request)) + b"}"
    assert len(at_limit) == MAX_REQUEST_BYTES
    status, answer = post(address, "/v1/completions", at_limit)
    assert status == 200, answer
    assert json.loads(answer)["usage"]["completion_tokens"] == 2
    status, answer = post(address, "/v1/completions", at_limit[:-1] + b" }")
    _check_too_large(status, json.loads(answer))


def test_tokenize_and_detokenize_refuse_what_no_prompt_of_the_context_holds(address):
    status, answer = post(address, "/detokenize",
                          json.dumps({"tokens": [7] * (MAX_MODEL_LEN + 1)}).encode())
    assert status == 400 and json.loads(answer)["error"]["param"] == "tokens", answer
    status, answer = post(address, "/detokenize",
                          json.dumps({"tokens": [7] * MAX_MODEL_LEN}).encode())
    assert status == 200 and json.loads(answer)["prompt"], answer
    status, answer = post(address, "/tokenize",
                          json.dumps({"prompt": "a" * (2 << 20)}).encode())
    assert status == 400 and json.loads(answer)["error"]["param"] == "prompt", answer
    status, answer = post(address, "/tokenize", json.dumps({"messages": [
        {"role": "user", "content": "a" * (2 << 20)}]}).encode())
    assert status == 400 and json.loads(answer)["error"]["param"] == "messages", answer


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize",
                                  "/detokenize"])
def test_a_model_that_is_not_a_string_is_400_naming_it(address, path):
    for model in ([SERVED_MODEL_NAME], {"name": SERVED_MODEL_NAME}, 7):
        body = {"model": model, "prompt": "Hello", "tokens": [1],
                "messages": [{"role": "user", "content": "Hello"}]}
        status, answer = post(address, path, json.dumps(body).encode())
        assert status == 400, (model, status, answer)
        assert json.loads(answer)["error"]["param"] == "model"
