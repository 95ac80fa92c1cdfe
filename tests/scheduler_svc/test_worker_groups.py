"""Several schedulers on one registry: worker groups, and sharing one group's workers
(--max-workers). Real workers (tiny random model), real Redis, real gRPC."""

from __future__ import annotations

import asyncio

import pytest

from tests.scheduler_svc.harness import (
    collect,
    run,
    running_scheduler,
    running_worker,
    submit_request,
    wait_until,
)
from tests.worker_svc.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-groups"))


def _db(redis_server: str, number: int) -> str:
    import redis

    url = redis_server.rsplit("/", 1)[0] + f"/{number}"
    redis.Redis.from_url(url).flushdb()
    return url


def test_each_scheduler_links_only_the_workers_of_its_group(model_path, redis_server):
    url = _db(redis_server, 10)

    async def main():
        async with running_worker(model_path, url, worker_group="a") as wa, \
                running_worker(model_path, url, worker_group="b") as wb, \
                running_worker(model_path, url) as w_default, \
                running_scheduler(redis_url=url, worker_group="a") as (sa, stub_a), \
                running_scheduler(redis_url=url, worker_group="b") as (sb, _):
            await wait_until(lambda: sa.pool.links and sb.pool.links, 10.0, "links")
            await asyncio.sleep(0.5)  # several discovery rounds
            tokens, responses = await collect(stub_a, submit_request("g", [5, 6, 7],
                                                                     max_tokens=3))
            return (set(sa.pool.links), set(sb.pool.links), responses[-1].worker_id,
                    wa.worker_id, wb.worker_id, w_default.worker_id, len(tokens))

    linked_a, linked_b, served_by, wa, wb, w_default, num_tokens = run(main())
    assert linked_a == {wa} and linked_b == {wb}
    assert w_default not in linked_a | linked_b
    assert served_by == wa and num_tokens == 3


def test_schedulers_with_max_workers_split_one_group(model_path, redis_server):
    url = _db(redis_server, 11)

    async def main():
        async with running_worker(model_path, url) as w1, \
                running_worker(model_path, url) as w2, \
                running_worker(model_path, url) as w3, \
                running_worker(model_path, url) as w4, \
                running_scheduler(redis_url=url, max_workers=2) as (s1, _), \
                running_scheduler(redis_url=url, max_workers=2) as (s2, _):
            await wait_until(lambda: len(s1.pool.links) == len(s2.pool.links) == 2, 20.0,
                             "each scheduler holding two workers")
            await asyncio.sleep(0.5)  # more discovery rounds change nothing
            return (set(s1.pool.links), set(s2.pool.links),
                    {w.worker_id for w in (w1, w2, w3, w4)})

    first, second, workers = run(main())
    assert len(first) == len(second) == 2
    assert first | second == workers and not first & second
