"""In-process worker and scheduler servers on loopback for the service tests."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging

import grpc

from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from gridllm.common.tls import SCHEDULER_SERVER_NAME, internal_channel
from gridllm.v1 import generate_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc.server import SchedulerServer, SchedulerServiceConfig
from worker_svc.server import WorkerOptions, WorkerServer

BLOCK_SIZE = 4
NUM_KV_BLOCKS = 64
MAX_NUM_BATCHED_TOKENS = 16


def engine_configs(model_path: str) -> tuple[ModelConfig, CacheConfig, SchedulerConfig]:
    """The configs both the worker and the in-process reference engine use."""
    return (ModelConfig(model=model_path, skip_tokenizer_init=True),
            CacheConfig(block_size=BLOCK_SIZE, num_kv_blocks=NUM_KV_BLOCKS),
            SchedulerConfig(max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS))


@contextlib.asynccontextmanager
async def running_worker(model_path: str, redis_url: str | None = None, **options):
    server = WorkerServer(*engine_configs(model_path),
                          WorkerOptions(redis_url=redis_url, heartbeat_ttl=3.0, **options))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0)


@contextlib.asynccontextmanager
async def running_scheduler(worker_addresses=(), redis_url: str | None = None, **kwargs):
    config = SchedulerServiceConfig(
        scheduler_config=kwargs.pop("scheduler_config", None) or SchedulerConfig(
            max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS),
        worker_addresses=list(worker_addresses), redis_url=redis_url,
        **{"discovery_interval": 0.1, "heartbeat_ttl": 3.0, **kwargs})
    server = SchedulerServer(config)
    await server.start()
    # With TLS the test dials as the router does: the deployment's certificate.
    channel = internal_channel(server.address, config.tls, SCHEDULER_SERVER_NAME)
    try:
        yield server, scheduler_pb2_grpc.SchedulerStub(channel)
    finally:
        await channel.close()
        await server.stop(grace=0)


def submit_request(req_id: str, prompt: list[int], **params) -> scheduler_pb2.SubmitRequest:
    params.setdefault("temperature", 0.0)
    return scheduler_pb2.SubmitRequest(request_id=req_id, prompt_token_ids=prompt,
                                       sampling_params=generate_pb2.SamplingParams(**params))


async def collect(stub, request: scheduler_pb2.SubmitRequest):
    """Run one Submit stream to the end.

    Returns:
        (token ids, every response).
    """
    responses = [r async for r in stub.Submit(request, timeout=60)]
    return [t for r in responses for t in r.token_ids], responses


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition",
                     state=None) -> None:
    """Poll ``predicate`` until it holds; TimeoutError after ``timeout`` seconds, naming
    ``what`` and, with ``state`` (a callable), what it returned then (for triage)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            seen = f" (state: {state()!r})" if state is not None else ""
            raise TimeoutError(f"{what} not reached within {timeout}s{seen}")
        await asyncio.sleep(0.02)


async def read_rest(call) -> list:
    """Read a stream started with ``call.read()`` to its end (iteration can't be mixed in)."""
    responses = []
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            return responses
        responses.append(response)


def run(coro, timeout: float = 60.0):
    """asyncio.run with a bound; on timeout the pending tasks' stacks go to the log."""
    async def bounded():
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if task in done:
            return task.result()
        for pending in asyncio.all_tasks():
            logging.getLogger(__name__).error("pending task %s: %s", pending.get_name(),
                                              " -> ".join(_await_chain(pending.get_coro())))
        task.cancel()
        raise TimeoutError(f"test body did not finish within {timeout}s")

    return asyncio.run(bounded())


def _await_chain(coro) -> list[str]:
    import gc

    chain = []
    while coro is not None:
        if type(coro).__name__ == "async_generator_asend":
            # The asend wrapper hides its generator; find it among the referents.
            gens = [g for g in gc.get_referents(coro) if inspect.isasyncgen(g)]
            coro = gens[0] if gens else None
            continue
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}" if frame else repr(coro))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return chain
