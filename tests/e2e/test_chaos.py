"""Faults under load, end to end: the stack of ``gridllm up`` (its own Redis, a scheduler,
two workers, the router) with its supervisor, on loopback, serving the tiny model.

- Chaos: 50 greedy streams run while a worker, then the scheduler, then Redis are killed
  (``SIGKILL``, one at a time: the next once the services report the recovery and every
  stream moved on; Redis is first frozen with ``SIGSTOP`` and every stream must move on
  while it hangs). Every stream must complete with the tokens and text of an undisturbed
  run (each prompt streamed once on the same stack), every KV block must be free afterwards
  and every process back (restarted by the supervisor).
- Health: the router reports NOT_SERVING within two heartbeat intervals of its last worker
  dying, and SERVING once the restarted workers are linked again.
- Drain: stopping the stack with streams in flight completes them all; a new request during
  the drain gets UNAVAILABLE.

The tests share one stack and run in file order (the last one stops it).
"""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gridllm.client import AsyncClient, Client
from gridllm.common.config import CacheConfig
from gridllm.common.grpc_utils import LIVENESS_SERVICE
from gridllm.common.redis_keys import DEFAULT_KEYS as KEYS
from gridllm.common.sampling_params import SamplingParams
from gridllm.launcher import LocalStack, StackConfig
from gridllm.supervisor import RestartPolicy
from router.server import RouterOptions
from scheduler_svc.server import SchedulerServiceConfig

pytestmark = pytest.mark.slow

NUM_STREAMS = 50
# Long enough that every fault lands while the streams run.
NUM_TOKENS = 500
# Streams that must be mid-way (started, unfinished) when each fault strikes.
MIN_RUNNING_AT_FAULT = NUM_STREAMS // 2
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
# Heartbeat interval = TTL / 3: one second.
HEARTBEAT_TTL_S = 3.0
HEARTBEAT_INTERVAL_S = HEARTBEAT_TTL_S / 3
# Every stream on one worker fits its KV pool (prompt + NUM_TOKENS, 16 tokens per block).
NUM_KV_BLOCKS = NUM_STREAMS * (NUM_TOKENS // 16 + 3)
# Seconds Redis stays frozen with every stream required to move on meanwhile (the services'
# Redis calls time out after 2 s: a step waiting on one would stall every stream).
REDIS_FROZEN_S = 1.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Shorter than a KV block (16 tokens): no prefix affinity, load spreads the streams over
# both workers; stream i sends PROMPTS[i % len(PROMPTS)].
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time", "Hello gridllm",
           "tiny model tokens", "jumps over the lazy dog", "multi-byte characters"]


def prompts(num: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(num)]


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


class Streams:
    """Runs streams in a background thread and records each one's tokens as they arrive."""

    def __init__(self, endpoint: str, texts: list[str], params: SamplingParams):
        self.endpoint, self.texts, self.params = endpoint, texts, params
        self.token_ids: list[list[int]] = [[] for _ in texts]
        self.text: list[str] = ["" for _ in texts]
        self.finish_reasons: list[str | None] = [None for _ in texts]
        self.errors: list[BaseException | None] = [None for _ in texts]
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> Streams:
        self._thread.start()
        return self

    async def _run(self) -> None:
        async with AsyncClient(self.endpoint, timeout=180.0) as client:
            async def one(i: int) -> None:
                try:
                    async for chunk in client.generate_stream(self.texts[i], self.params,
                                                              return_token_ids=True):
                        self.token_ids[i] += chunk.token_ids
                        self.text[i] += chunk.text
                        self.finish_reasons[i] = chunk.finish_reason
                except Exception as exc:  # noqa: BLE001 - reported by the test
                    self.errors[i] = exc
            await asyncio.gather(*(one(i) for i in range(len(self.texts))))

    def counts(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]

    def all_advanced_past(self, counts: list[int], num_more: int) -> bool:
        """Every unfinished stream got ``num_more`` tokens beyond ``counts``."""
        return all(now >= min(then + num_more, self.params.max_tokens)
                   for now, then in zip(self.counts(), counts, strict=True))

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"streams still running after {timeout_s}s"


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2.0).status
        except grpc.RpcError:
            return -1


def all_blocks_free(client: Client) -> bool:
    stats = client.server_stats()
    return (stats.num_requests_running == 0 and stats.num_requests_waiting == 0
            and stats.num_workers_alive == 2
            and all(w.kv_blocks_free == w.kv_blocks_total for w in stats.workers if w.is_alive))


def every_process_back(stack: LocalStack) -> bool:
    assert stack.supervisor is not None and stack.supervisor.error is None
    return (stack.supervisor.is_settled() and all(p.is_alive() for p in stack.processes)
            and len(stack.processes) == 5)


@pytest.fixture(scope="module")
def stack(tiny_served_model, tmp_path_factory):
    config = StackConfig(
        model=tiny_served_model, num_workers=2, port=0,
        log_dir=str(tmp_path_factory.mktemp("chaos-logs")), startup_timeout_s=120.0,
        stop_grace_s=15.0, cache_config=CacheConfig(num_kv_blocks=NUM_KV_BLOCKS),
        scheduler_options=SchedulerServiceConfig(discovery_interval=0.3,
                                                 heartbeat_ttl=HEARTBEAT_TTL_S),
        router_options=RouterOptions(model=tiny_served_model, scheduler_wait_s=60.0),
        restart_policy=RestartPolicy(backoff_base_s=0.2),
        env={"GRIDLLM_LOGGING_LEVEL": "INFO"})
    stack = LocalStack(config).start()
    stack.start_supervising(interval_s=0.05)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.endpoint, timeout=30.0) as c:
        yield c


def registry(stack: LocalStack) -> tuple[set[str], int]:
    """Worker ids and the number of schedulers registered in the stack's Redis."""
    import redis

    r = redis.Redis.from_url(stack.redis_url, socket_timeout=2.0)
    try:
        workers = {k.decode().rsplit(":", 1)[-1] for k in r.scan_iter(KEYS.worker_pattern)}
        return workers, len(list(r.scan_iter(KEYS.scheduler_pattern)))
    except redis.RedisError:
        return set(), 0
    finally:
        r.close()


@pytest.fixture(scope="module")
def undisturbed(stack) -> Streams:
    """Each prompt streamed once with no fault: the reference of the tests below."""
    streams = Streams(stack.endpoint, PROMPTS, GREEDY).start()
    streams.join(120.0)
    assert streams.errors == [None] * len(PROMPTS)
    assert streams.counts() == [NUM_TOKENS] * len(PROMPTS)
    return streams


def expected_tokens(undisturbed: Streams, num: int, max_tokens: int = NUM_TOKENS
                    ) -> list[list[int]]:
    return [undisturbed.token_ids[i % len(PROMPTS)][:max_tokens] for i in range(num)]


def test_every_stream_survives_a_worker_the_scheduler_and_redis_dying(stack, client,
                                                                      undisturbed):
    streams = Streams(stack.endpoint, prompts(NUM_STREAMS), GREEDY).start()
    wait_until(lambda: min(streams.counts()) >= 3, 60.0, "every stream under way")
    # Tokens every stream had when each fault was injected.
    progress: dict[str, list[int]] = {}
    # Seconds from each fault until it was recovered from and every stream moved on.
    recovery_s: dict[str, float] = {}

    def fault(name: str, inject, recovered) -> None:
        # One at a time: the next fault once the services recovered from this one (as
        # they report it, not as the streams show it: a client can lag behind) and every
        # stream moved on since.
        progress[name] = streams.counts()
        started = time.monotonic()
        inject()
        wait_until(recovered, 60.0, f"recovery from: {name}", interval_s=0.02)
        since = streams.counts()
        wait_until(lambda: streams.all_advanced_past(since, 5), 60.0,
                   f"every stream moving on after: {name}")
        recovery_s[name] = time.monotonic() - started

    dead_worker = stack.workers[0]
    dead_worker_ids = {w.worker_id for w in client.server_stats().workers}
    fault("worker dies", lambda: dead_worker.signal(signal.SIGKILL),
          # Its requests moved to the other worker: only that one is left linked.
          lambda: len(dead_worker_ids & {w.worker_id for w in client.server_stats().workers})
          == 1)
    dead_scheduler = stack.scheduler
    seen_down = threading.Event()

    def scheduler_back() -> bool:
        # The router saw it go, then a restarted one with a worker linked.
        is_serving = health(stack.endpoint) == SERVING
        if not is_serving:
            seen_down.set()
        return seen_down.is_set() and is_serving and stack.scheduler is not dead_scheduler

    fault("scheduler dies", lambda: dead_scheduler.signal(signal.SIGKILL), scheduler_back)
    redis_process = stack.redis
    assert redis_process is not None
    frozen_at: list[float] = []

    def freeze_redis() -> None:
        redis_process.signal(signal.SIGSTOP)
        frozen_at.append(time.monotonic())

    # Recovered, as far as anything waits on Redis: nothing does. Still frozen afterwards.
    fault("redis hangs", freeze_redis,
          lambda: time.monotonic() - frozen_at[0] > REDIS_FROZEN_S)
    assert redis_process.exit_code() is None
    fault("redis dies", lambda: redis_process.signal(signal.SIGKILL),
          # Restarted, and every worker and the scheduler registered in it again.
          lambda: stack.redis is not redis_process and registry(stack) == (
              {w.worker_id for w in client.server_stats().workers}, 1))
    streams.join(180.0)

    # Every fault landed mid-stream for most streams (they run at different paces: the
    # two workers step at different speeds, and a resubmission resumes them unevenly).
    num_running = {name: sum(0 < n < NUM_TOKENS for n in counts)
                   for name, counts in progress.items()}
    # The figures docs/reliability.md quotes (pytest -s shows them).
    print(f"\nchaos: {NUM_STREAMS} streams, faults {list(recovery_s)}, streams mid-way at "
          f"each {num_running}, seconds until every stream advanced again "
          f"{ {k: round(v, 2) for k, v in recovery_s.items()} }")
    assert all(n >= MIN_RUNNING_AT_FAULT for n in num_running.values()), num_running
    assert streams.errors == [None] * NUM_STREAMS
    assert streams.finish_reasons == ["length"] * NUM_STREAMS
    assert streams.token_ids == expected_tokens(undisturbed, NUM_STREAMS)
    assert streams.text == [undisturbed.text[i % len(PROMPTS)] for i in range(NUM_STREAMS)]
    wait_until(lambda: every_process_back(stack) and all_blocks_free(client), 60.0,
               "every process back and every KV block free")
    assert {name: stack.supervisor.num_restarts(name)
            for name in ("redis", "scheduler", "worker-1", "worker-2", "router")} == {
        "redis": 1, "scheduler": 1, "worker-1": 1, "worker-2": 0, "router": 0}
    # The restarted Redis holds the registry and every worker's block-state mirror again.
    import redis

    r = redis.Redis.from_url(stack.redis_url)
    try:
        for worker_stats in client.server_stats().workers:
            assert r.exists(KEYS.kv_state_key(worker_stats.worker_id))
    finally:
        r.close()
    # As the services saw it: the dead worker's requests moved mid-stream, and the router
    # resubmitted streams mid-way when the scheduler died.
    with open(stack.scheduler.log_path) as log:
        moved = [int(n) for n in re.findall(r"lost with (\d+) requests; resuming", log.read())]
    with open(stack.router.log_path) as log:
        resubmitted_after = [int(n) for n in re.findall(r"after (\d+) tokens; resubmitting",
                                                        log.read())]
    assert len(moved) == 1 and moved[0] >= 1
    assert len(resubmitted_after) >= MIN_RUNNING_AT_FAULT
    assert all(0 < n < NUM_TOKENS for n in resubmitted_after)


def test_router_is_not_serving_without_a_live_worker_and_serving_once_one_returns(stack, client):
    wait_until(lambda: health(stack.endpoint) == SERVING, 30.0, "the router serving")
    first, last = stack.workers
    first.signal(signal.SIGKILL)
    last.signal(signal.SIGKILL)
    died_at = time.monotonic()
    wait_until(lambda: health(stack.endpoint) == NOT_SERVING, 2 * HEARTBEAT_INTERVAL_S,
               "the router to report NOT_SERVING", interval_s=0.02)
    noticed_after_s = time.monotonic() - died_at
    # Alive all along: nothing to restart about the router itself.
    assert health(stack.endpoint, LIVENESS_SERVICE) == SERVING
    with pytest.raises(grpc.RpcError) as refused:
        client.generate("Hello", SamplingParams(max_tokens=2))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no scheduler with a live worker" in refused.value.details()
    wait_until(lambda: health(stack.endpoint) == SERVING, 60.0, "the router serving again")
    print(f"\nhealth: NOT_SERVING {noticed_after_s:.2f}s after the last worker died, SERVING "
          f"again {time.monotonic() - died_at:.1f}s after (restarted by the supervisor)")
    assert noticed_after_s < 2 * HEARTBEAT_INTERVAL_S
    assert stack.workers[0] is not first and stack.workers[1] is not last
    wait_until(lambda: every_process_back(stack), 30.0, "both workers back")
    assert client.generate("Hello", SamplingParams(max_tokens=4)).outputs[0].finish_reason


def test_stopping_the_stack_drains_streams_and_refuses_new_requests(stack, undisturbed):
    num_streams = 10
    # Long enough that the drain begins mid-stream on a fast machine too (at 125 tokens a
    # quick stack sometimes finished every stream before the router reported draining).
    params = GREEDY.clone(max_tokens=NUM_TOKENS // 2)
    streams = Streams(stack.endpoint, prompts(num_streams), params).start()
    wait_until(lambda: min(streams.counts()) >= 3, 60.0, "every stream under way")
    router = stack.router
    with Client(stack.endpoint, timeout=10.0) as late:
        # Connected before the drain: the late request goes out the moment it starts, not
        # after a new connection's handshake (by then a quiet machine may have finished the
        # streams and the router closed its transport).
        late.model_info()
        stopper = threading.Thread(target=stack.stop)
        stopper.start()
        wait_until(lambda: health(stack.endpoint) != SERVING, 10.0, "the router to drain",
                   interval_s=0.01)
        drained_at = streams.counts()
        with pytest.raises(grpc.RpcError) as refused:
            late.generate("Hello", SamplingParams(max_tokens=2))
    streams.join(60.0)
    stopper.join(120.0)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # Refused by the router's handler, which says why (the transport keeps taking calls
    # until the in-flight streams end), not by a closing transport.
    assert "shutting down" in (refused.value.details() or ""), refused.value.details()
    assert max(drained_at) < params.max_tokens  # the drain began mid-stream
    assert streams.errors == [None] * num_streams
    # Greedy: the undisturbed streams' first max_tokens tokens.
    assert streams.token_ids == expected_tokens(undisturbed, num_streams, params.max_tokens)
    assert router.exit_code() == 0
    assert not any(p.is_alive() for p in stack.processes)
