"""Which workers a scheduler links: mutual TLS, model identity and the deployment namespace.

Real workers (tiny random model) and schedulers over gRPC on loopback, a real Redis, and
certificates made here. A refused worker must never get a Step stream (no step, no request)
while the greedy outputs of the linked workers stay those of the in-process engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid

import grpc
import pytest

from gridllm.common.config import CacheConfig
from gridllm.common.sampling_params import SamplingParams
from gridllm.common.tls import WORKER_SERVER_NAME, TlsOptions, internal_channel
from gridllm.common.tls_certs import LOCAL_NAMES, Authority
from gridllm.v1 import worker_pb2, worker_pb2_grpc
from tests.scheduler_svc.harness import (
    NUM_KV_BLOCKS,
    collect,
    engine_configs,
    run,
    running_scheduler,
    running_worker,
    submit_request,
    wait_until,
)
from tests.scheduler_svc.test_server import PROMPTS, reference_tokens
from worker_svc.server import WorkerOptions, WorkerServer
from worker_svc.server import model_config_hash as config_hash_of

MAX_TOKENS = 8
# Discovery looks every 0.1 s in the harness: a refused worker is offered many times.
NUM_DISCOVERY_ROUNDS_S = 1.5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    from tests.worker_svc.tiny_models import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def other_model_path(tmp_path_factory) -> str:
    from tests.worker_svc.tiny_models import make_tiny_model

    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
def expected(model_path) -> list[list[int]]:
    return reference_tokens(model_path, PROMPTS,
                            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))


def tls_dir(authority: Authority, root, role_name: str) -> TlsOptions:
    path = authority.write_tls_dir(str(root / f"{role_name}-{uuid.uuid4().hex[:6]}"),
                                   role_name, LOCAL_NAMES)
    return TlsOptions(tls_dir=path)


async def greedy(stub) -> list[list[int]]:
    results = await asyncio.gather(*(collect(stub, submit_request(f"g{i}", p,
                                                                  max_tokens=MAX_TOKENS))
                                     for i, p in enumerate(PROMPTS)))
    return [tokens for tokens, _ in results]


def assert_never_stepped(worker: WorkerServer) -> None:
    assert worker.servicer.num_steps == 0
    assert not worker.runner.requests


def test_worker_with_a_certificate_of_another_ca_is_never_linked(model_path, redis_server,
                                                                 expected, tmp_path):
    ours, theirs = Authority(), Authority("another CA")
    deployment = f"mtls-{uuid.uuid4().hex[:8]}"

    async def main():
        async with running_worker(model_path, redis_server, deployment=deployment,
                                  tls=tls_dir(ours, tmp_path, WORKER_SERVER_NAME)) as good, \
                running_worker(model_path, redis_server, deployment=deployment,
                               tls=tls_dir(theirs, tmp_path, WORKER_SERVER_NAME)) as rogue, \
                running_scheduler(redis_url=redis_server, deployment=deployment,
                                  tls=tls_dir(ours, tmp_path, "gridllm-scheduler")
                                  ) as (server, stub):
            pool = server.pool
            await wait_until(lambda: good.worker_id in pool.links, 10.0, "good worker linked")
            await wait_until(lambda: rogue.address in pool.refused, 10.0, "rogue refused")
            await asyncio.sleep(NUM_DISCOVERY_ROUNDS_S)
            tokens = await greedy(stub)
            assert list(pool.links) == [good.worker_id]
            assert "mutual TLS" in pool.refused[rogue.address]
            assert_never_stepped(rogue)

            # Nor can anyone without the deployment's certificate reach a worker's RPCs.
            for tls in (None, tls_dir(theirs, tmp_path, "gridllm-scheduler")):
                channel = internal_channel(good.address, tls, WORKER_SERVER_NAME)
                stub_w = worker_pb2_grpc.WorkerStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stub_w.GetInfo(worker_pb2.GetWorkerInfoRequest(), timeout=3.0)
                assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
                await channel.close()
            # ... nor the scheduler's (a router of another deployment).
            plain = grpc.aio.insecure_channel(server.address)
            from gridllm.v1 import scheduler_pb2_grpc

            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await collect(scheduler_pb2_grpc.SchedulerStub(plain),
                              submit_request("intruder", PROMPTS[0], max_tokens=2))
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            await plain.close()
            return tokens

    assert run(main()) == expected


def test_worker_serving_another_model_block_size_or_quantization_is_refused(
        model_path, other_model_path, redis_server, expected, caplog):
    deployment = f"identity-{uuid.uuid4().hex[:8]}"
    model_config, cache_config, scheduler_config = engine_configs(model_path)
    other_config = engine_configs(other_model_path)

    async def main():
        rogues = [
            # The same model with twice the block size.
            WorkerServer(model_config, CacheConfig(block_size=cache_config.block_size * 2,
                                                   num_kv_blocks=NUM_KV_BLOCKS),
                         scheduler_config, WorkerOptions(redis_url=redis_server,
                                                         deployment=deployment)),
            # Another model.
            WorkerServer(*other_config, WorkerOptions(redis_url=redis_server,
                                                      deployment=deployment)),
            # The same model with FP8 weights and KV cache.
            WorkerServer(dataclasses.replace(model_config, quantization="fp8"),
                         CacheConfig(block_size=cache_config.block_size,
                                     num_kv_blocks=NUM_KV_BLOCKS, kv_cache_dtype="fp8"),
                         scheduler_config, WorkerOptions(redis_url=redis_server,
                                                         deployment=deployment)),
        ]
        async with running_worker(model_path, redis_server, deployment=deployment) as good, \
                running_scheduler(redis_url=redis_server, deployment=deployment
                                  ) as (server, stub):
            pool = server.pool
            await wait_until(lambda: good.worker_id in pool.links, 10.0, "good worker linked")
            try:
                for rogue in rogues:
                    await rogue.start()
                await wait_until(lambda: all(r.address in pool.refused for r in rogues), 10.0,
                                 "every rogue worker refused")
                tokens = await greedy(stub)
                await asyncio.sleep(NUM_DISCOVERY_ROUNDS_S)
                tokens_later = await greedy(stub)
                assert list(pool.links) == [good.worker_id]
                for rogue in rogues:
                    assert_never_stepped(rogue)
                return tokens, tokens_later, [pool.refused[r.address] for r in rogues]
            finally:
                for rogue in rogues:
                    await rogue.stop(grace=0)

    with caplog.at_level(logging.WARNING, logger="scheduler_svc.worker_pool"):
        tokens, tokens_later, reasons = run(main())
    assert tokens == expected and tokens_later == expected
    assert "block_size 8 != 4" in reasons[0] and "model " not in reasons[0]
    assert "model config hash" in reasons[1] and other_model_path in reasons[1]
    assert "quantization 'fp8' != ''" in reasons[2]
    assert "kv_cache_dtype 'float8_e4m3fn' != 'float32'" in reasons[2]
    refusals = [r.getMessage() for r in caplog.records if "refused worker" in r.getMessage()]
    # One clear line per refused worker, not one per discovery round.
    assert len(refusals) == 3, refusals


def test_config_hash_names_the_architecture_not_the_path(model_path, other_model_path,
                                                         tmp_path):
    import shutil

    import transformers

    copy = shutil.copytree(model_path, tmp_path / "copy")

    def digest(path) -> str:
        return config_hash_of(transformers.AutoConfig.from_pretrained(str(path)))

    assert digest(model_path) == digest(copy)
    assert digest(model_path) != digest(other_model_path)
    config = transformers.AutoConfig.from_pretrained(model_path)
    assert config_hash_of(config, "local:8") != digest(model_path)
    assert len(digest(model_path)) == 16


def test_two_deployments_in_one_redis_do_not_see_each_other(model_path, redis_server,
                                                            expected):
    import redis.asyncio as aioredis

    names = [f"dep-a-{uuid.uuid4().hex[:6]}", f"dep-b-{uuid.uuid4().hex[:6]}"]

    async def main():
        client = aioredis.from_url(redis_server)
        async with running_worker(model_path, redis_server, deployment=names[0]) as w_a, \
                running_worker(model_path, redis_server, deployment=names[1]) as w_b, \
                running_scheduler(redis_url=redis_server, deployment=names[0]) as (s_a, stub_a), \
                running_scheduler(redis_url=redis_server, deployment=names[1]) as (s_b, stub_b):
            await wait_until(lambda: w_a.worker_id in s_a.pool.links
                             and w_b.worker_id in s_b.pool.links, 10.0, "each linked")
            await asyncio.sleep(NUM_DISCOVERY_ROUNDS_S)
            tokens = [await greedy(stub_a), await greedy(stub_b)]
            await s_a.mirror.flush()
            await s_b.mirror.flush()
            links = [list(s_a.pool.links), list(s_b.pool.links)]
            keys = {}
            for name in names:
                keys[name] = sorted([k.decode()
                                     async for k in client.scan_iter(f"gridllm:{name}:*")])
        await client.aclose()
        return tokens, links, keys, (w_a.worker_id, w_b.worker_id)

    tokens, links, keys, (id_a, id_b) = run(main())
    assert tokens == [expected, expected]
    assert links == [[id_a], [id_b]]
    for name, own, other in ((names[0], id_a, id_b), (names[1], id_b, id_a)):
        assert f"gridllm:{name}:kv:{own}:cached" in keys[name]
        assert f"gridllm:{name}:{{kv-events}}" in keys[name]
        assert not any(other in key for key in keys[name])


def test_an_acl_user_limited_to_its_deployment_keys_serves(model_path, redis_server, expected):
    """The ACL docs/deploy.md gives a deployment's services is all they need: the worker
    registers, the scheduler links it, mirrors its blocks and publishes KV events."""
    import redis.asyncio as aioredis

    deployment = f"acl-{uuid.uuid4().hex[:8]}"
    user, password = f"gridllm-{deployment}", uuid.uuid4().hex
    categories = ["+@read", "+@write", "+@keyspace", "+@stream", "+@scripting",
                  "+@connection"]

    async def main():
        admin = aioredis.from_url(redis_server)
        try:
            await admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"],
                                    keys=[f"gridllm:{deployment}:*"], commands=categories)
        except Exception as exc:  # noqa: BLE001 - a server without ACLs (Redis < 6)
            await admin.aclose()
            pytest.skip(f"no ACL support: {exc}")
        url = f"redis://{user}:{password}@{redis_server.split('://', 1)[1]}"
        try:
            async with running_worker(model_path, url, deployment=deployment) as worker, \
                    running_scheduler(redis_url=url, deployment=deployment) as (server, stub):
                await wait_until(lambda: worker.worker_id in server.pool.links, 10.0, "linked")
                tokens = await greedy(stub)
                await server.mirror.flush()
                published = server.mirror.events.num_published
                cached = await admin.hlen(f"gridllm:{deployment}:kv:{worker.worker_id}:cached")
            return tokens, published, cached
        finally:
            await admin.acl_deluser(user)
            await admin.aclose()

    tokens, published, cached = run(main())
    assert tokens == expected
    assert published > 0 and cached > 0
