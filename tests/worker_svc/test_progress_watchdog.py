"""The worker's forward-progress watchdog: a step that runs too long makes the worker
NOT_SERVING (readiness and liveness) and takes it out of the registry; when the step
finishes, it serves and registers again. An idle worker is never stalled."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gridllm.common.grpc_utils import LIVENESS_SERVICE
from gridllm.common.redis_keys import DEFAULT_KEYS as KEYS
from gridllm.v1 import worker_pb2_grpc
from tests.worker_svc.test_server import CONFIGS, _new_request_step
from worker_svc.server import WorkerOptions, WorkerServer

PROGRESS_TIMEOUT_S = 0.4
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _GatedRunner:
    """A real runner whose steps wait for ``gate`` (a wedged forward pass, on demand)."""

    def __init__(self, runner):
        self.runner = runner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def _wait(self):
        self.entered.set()
        assert self.gate.wait(30)

    def execute_model(self, scheduler_output):
        self._wait()
        return self.runner.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output):
        # The worker queues steps (launch now, read back later): the launch wedges.
        self._wait()
        return self.runner.execute_model_async(scheduler_output)


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    from gridllm.common.config import ModelConfig
    from worker_svc.model_runner import ModelRunner

    return ModelRunner(ModelConfig(model=tiny_model_dir("llama"), skip_tokenizer_init=True),
                       CONFIGS["cache_config"], CONFIGS["scheduler_config"])


def test_a_stalled_step_turns_the_worker_not_serving_until_it_finishes(runner, redis_server):
    import redis.asyncio as aioredis

    from gridllm.common.config import ModelConfig

    gated = _GatedRunner(runner)
    runner.requests.clear()

    async def main():
        server = WorkerServer(ModelConfig(model="tiny-llama"), CONFIGS["cache_config"],
                              CONFIGS["scheduler_config"],
                              WorkerOptions(redis_url=redis_server,
                                            progress_timeout=PROGRESS_TIMEOUT_S),
                              runner=gated)
        await server.start()
        client = aioredis.from_url(redis_server)
        key = KEYS.worker_key(server.worker_id)
        seen: dict[str, object] = {}
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)

                async def status() -> tuple[int, int]:
                    ready = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    live = await health.Check(
                        health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=5)
                    return ready.status, live.status

                async def wait_for(wanted: tuple[int, int], is_registered: bool) -> float:
                    start = time.monotonic()
                    while (await status() != wanted
                           or bool(await client.exists(key)) != is_registered):
                        assert time.monotonic() - start < 10, f"never reached {wanted}"
                        await asyncio.sleep(0.02)
                    return time.monotonic() - start

                # Idle for longer than the timeout: not a stall.
                await asyncio.sleep(PROGRESS_TIMEOUT_S * 2)
                seen["idle"] = (await status(), bool(await client.exists(key)))
                gated.gate.clear()
                stream = worker_pb2_grpc.WorkerStub(channel).Step()
                await stream.write(_new_request_step(1, "a", [0]))
                await asyncio.get_running_loop().run_in_executor(None, gated.entered.wait, 10)
                seen["stalled_after_s"] = await wait_for((NOT_SERVING, NOT_SERVING), False)
                gated.gate.set()
                response = await stream.read()
                seen["step_id"] = response.step_id
                seen["recovered_after_s"] = await wait_for((SERVING, SERVING), True)
                await stream.done_writing()
        finally:
            gated.gate.set()
            await client.aclose()
            await server.stop(0)
        return seen

    seen = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert seen["idle"] == ((SERVING, SERVING), True)
    # The step had run PROGRESS_TIMEOUT_S when it was noticed, plus at most one check.
    assert seen["stalled_after_s"] < 2.0
    assert seen["step_id"] == 1
    assert seen["recovered_after_s"] < 2.0
