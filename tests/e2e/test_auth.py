"""API keys on a real stack (``gridllm up``'s launcher): the gRPC and HTTP fronts refuse calls
without a valid key, a key's tenant reaches the scheduler, and request ids are the clients'
own: two clients using one id (with n=2) never collide, and naming another's request
upstream aborts nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import stat
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gridllm.client import AsyncClient, Client
from gridllm.common.auth import TENANT_KEY
from gridllm.common.sampling_params import SamplingParams
from gridllm.launcher import LocalStack
from gridllm.v1 import scheduler_pb2, scheduler_pb2_grpc
from router.server import RouterOptions
from tests.e2e.conftest import SERVED_MODEL_NAME, stack_config

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

ALICE, BOB, CAROL = "alice-key-0123456789", "bob-key-0123456789", "carol-key-0123456789"
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def auth_stack(tiny_served_model, e2e_redis_url, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    # Alice's key as itself, Bob's as its digest only; Carol's comes as a flag.
    key_file.write_text(f"# tenants\n{ALICE} alice\nsha256:{sha(BOB)} bob\n")
    options = RouterOptions(model=tiny_served_model, served_model_name=SERVED_MODEL_NAME,
                            api_keys=[CAROL], api_key_file=str(key_file))
    config = stack_config(tiny_served_model, e2e_redis_url,
                          str(tmp_path_factory.mktemp("auth-stack-logs")), num_workers=1,
                          http_port=0, router_options=options)
    with LocalStack(config) as stack:
        yield stack


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def log_text(stack: LocalStack, name: str) -> str:
    with open(os.path.join(stack.log_dir, f"{name}.log")) as f:
        return f.read()


def test_grpc_calls_without_a_valid_key_are_unauthenticated(auth_stack):
    for key in ("", "wrong-key-0123456789", f"sha256:{sha(ALICE)}"):
        with Client(auth_stack.endpoint, timeout=30.0, api_key=key) as client:
            for call in (client.model_info, lambda c=client: c.generate("Hi", GREEDY),
                         lambda c=client: c.tokenize("Hi")):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, key
                assert "authorization: Bearer" in info.value.details()
    # Health and reflection stay open: probes carry no keys.
    with grpc.insecure_channel(auth_stack.endpoint) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10.0)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_valid_key_serves_and_its_tenant_reaches_the_scheduler(auth_stack):
    outputs = {}
    for key, tenant in ((ALICE, "alice"), (BOB, "bob"), (CAROL, f"key-{sha(CAROL)[:8]}")):
        with Client(auth_stack.endpoint, timeout=60.0, api_key=key) as client:
            assert client.model_info().model == SERVED_MODEL_NAME
            out = client.generate("Hello world", GREEDY, request_id=f"hello-{tenant}",
                                  return_token_ids=True)
            outputs[tenant] = out.outputs[0].token_ids
    # One model, greedy: every tenant gets the same tokens.
    assert len({tuple(ids) for ids in outputs.values()}) == 1
    assert len(outputs["alice"]) == GREEDY.max_tokens
    # A request's log line follows its last message: wait for it.
    for tenant in outputs:
        wait_until(lambda t=tenant: re.search(
            rf"request hello-{t}@[0-9a-f]{{16}} of tenant {t} length",
            log_text(auth_stack, "scheduler")), 10.0, f"{tenant}'s line in the scheduler log")
    wait_until(lambda: "tenant=alice status=OK" in log_text(auth_stack, "router"), 10.0,
               "alice's line in the router's access log")


def test_http_without_a_valid_key_is_401_and_open_paths_stay_open(auth_stack):
    base = auth_stack.http_endpoint
    for key in ("", "wrong-key-0123456789"):
        # The official client refuses an empty key itself; a header-less request is checked
        # with urllib below.
        if key:
            with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as oai, \
                    pytest.raises(openai.AuthenticationError) as info:
                oai.completions.create(model=SERVED_MODEL_NAME, prompt="Hi", max_tokens=2)
            assert info.value.status_code == 401
            assert info.value.code == "invalid_api_key"
    for path, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                       ("/v1/models", None), ("/tokenize", {"prompt": "Hi"})):
        request = urllib.request.Request(base + path, method="POST" if body else "GET",
                                         data=json.dumps(body).encode() if body else None)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        assert info.value.code == 401, path
        assert info.value.headers["WWW-Authenticate"] == "Bearer"
        error = json.loads(info.value.read())["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    for path in ("/health", "/ready", "/metrics"):
        with urllib.request.urlopen(base + path, timeout=30) as reply:
            assert reply.status == 200, path
    with openai.OpenAI(base_url=base + "/v1", api_key=ALICE, max_retries=0) as oai:
        completion = oai.completions.create(model=SERVED_MODEL_NAME, prompt="Hello world",
                                            max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens == 4
    with urllib.request.urlopen(base + "/metrics", timeout=30) as reply:
        metrics = reply.read().decode()
    assert any(line.startswith("gridllm:tenant_requests_total{") and 'tenant="alice"' in line
               and 'code="OK"' in line and float(line.split()[-1]) >= 1
               for line in metrics.splitlines())


def test_two_clients_with_one_request_id_and_n2_both_succeed(auth_stack):
    params = SamplingParams(n=2, temperature=0.0, max_tokens=48, ignore_eos=True)

    async def one(key: str):
        async with AsyncClient(auth_stack.endpoint, timeout=60.0, api_key=key) as client:
            return await client.generate("Hello world", params, request_id="same",
                                         return_token_ids=True)

    async def main():
        # Two tenants, and two clients of one tenant, all with the id "same" at once.
        return await asyncio.gather(one(ALICE), one(BOB), one(ALICE))

    results = asyncio.run(asyncio.wait_for(main(), 120))
    for result in results:
        assert result.request_id == "same"
        assert [len(c.token_ids) for c in result.outputs] == [48, 48]
        assert [c.finish_reason for c in result.outputs] == ["length", "length"]
    assert len({tuple(c.token_ids) for r in results for c in r.outputs}) == 1


def test_an_abort_naming_another_clients_request_does_nothing(auth_stack):
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        async with AsyncClient(auth_stack.endpoint, timeout=60.0, api_key=ALICE) as client:
            stream = client.generate_stream("Hello world", params, request_id="victim")
            chunks = [await stream.__anext__()]
            async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{auth_stack.scheduler_port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                # Every id the client's own could be, from bob and with no tenant at all.
                replies = [await stub.Abort(scheduler_pb2.AbortRequest(
                    request_ids=["victim", "victim-0", "victim~1"]), metadata=metadata)
                    for metadata in (((TENANT_KEY, "bob"),), ((TENANT_KEY, "alice"),), ())]
            chunks += [c async for c in stream]
            return chunks, replies

    chunks, replies = asyncio.run(asyncio.wait_for(main(), 120))
    assert [list(r.aborted_request_ids) for r in replies] == [[], [], []]
    assert chunks[-1].finish_reason == "length"
    assert sum(len(c.text) > 0 for c in chunks) > 0
    num_tokens = chunks[-1].usage.completion_tokens
    assert num_tokens == 200


def test_the_router_gets_the_keys_hashed_never_on_its_command_line(auth_stack):
    argv = " ".join(auth_stack.router.argv)
    assert not any(key in argv for key in (ALICE, BOB, CAROL))
    key_file = argv.split("--api-key-file ", 1)[1].split()[0]
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    with open(key_file) as f:
        text = f.read()
    assert not any(key in text for key in (ALICE, BOB, CAROL))
    assert f"sha256:{sha(ALICE)} alice" in text and f"sha256:{sha(BOB)} bob" in text
    assert not any(key in log_text(auth_stack, name) for key in (ALICE, BOB, CAROL)
                   for name in ("router", "scheduler"))
