"""The worker service: a ModelRunner behind a bidirectional Step stream.

One scheduler drives a worker at a time. A new Step stream drops every per-request state
but keeps the KV cache, so blocks the scheduler mirrored to Redis stay valid after the
scheduler restarts. The worker registers itself in Redis under a unique id with a TTL
that a heartbeat refreshes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from gridllm.common.block_versions import bump_versions
from gridllm.common.cli_args import option
from gridllm.common.config import HEARTBEAT_TTL_S, check_port, require
from gridllm.common.contract import ModelRunnerOutput
from gridllm.common.convert import (
    model_limits_to_pb,
    runner_output_to_pb,
    scheduler_output_from_pb,
)
from gridllm.common.grpc_utils import (
    ServiceServer,
    advertised_address,
    stop_tasks,
    wait_or_stop,
)
from gridllm.common.http_server import HttpServer
from gridllm.common.metrics import serve_metrics
from gridllm.common.redis_client import async_redis, check_redis
from gridllm.common.redis_keys import DEFAULT_DEPLOYMENT, DEFAULT_KEYS, RedisKeys, check_deployment
from gridllm.common.request_ids import unscoped
from gridllm.common.tls import TlsOptions, server_credentials
from gridllm.v1 import worker_pb2, worker_pb2_grpc
from worker_svc.metrics import WorkerMetrics
from worker_svc.progress_watchdog import ProgressWatchdog

if TYPE_CHECKING:
    from worker_svc.runner_output import AsyncRunnerOutput

logger = logging.getLogger(__name__)

SERVICE_NAME = "gridllm.v1.Worker"
# Exit status of a worker whose tensor-parallel rank died.
EXIT_RANK_LOST = 75
# Steps queued on the runner before the oldest one's answer is sent (the scheduler pipelines
# at most two).
_MAX_QUEUED_STEPS = 2


@dataclass
class _QueuedStep:
    step_id: int
    output: AsyncRunnerOutput
    # When the step reached the worker (its answer reports the seconds since).
    start: float
    # Tokens and new requests of the step (for the metrics).
    num_tokens: int = 0
    num_new_requests: int = 0
    # Resolves once the output's host copies landed (waited for in a helper thread).
    ready: asyncio.Future | None = None


def _has_ended(next_step: asyncio.Future) -> bool:
    """True if the scheduler closed its side of the stream."""
    return (next_step.done() and not next_step.cancelled()
            and isinstance(next_step.exception(), StopAsyncIteration))
# Seconds between heartbeat retries while Redis is unreachable.
_RETRY_S = 0.5


@dataclass
class WorkerOptions:
    worker_id: str | None = option(None, default_help="a fresh uuid",
                                   help="unique id in the registry")
    host: str = option("127.0.0.1", help="address to bind")
    port: int = option(0, help="port to bind; 0 picks a free one")
    advertise_host: str | None = option(
        None, default_help="--host; the hostname if --host is 0.0.0.0",
        help="host put in the registry for schedulers to dial")
    redis_url: str | None = option(
        None, default_help="no registration: schedulers dial --worker",
        help="Redis to register in (e.g. redis://host:6379/0)")
    heartbeat_ttl: float = option(
        HEARTBEAT_TTL_S, metavar="S", help="seconds the registry entry outlives the last heartbeat")
    metrics_port: int | None = option(
        None, default_help="off",
        help="port of the Prometheus /metrics endpoint (on --host); 0 picks a free one")
    worker_group: str = option(
        "", metavar="NAME", help="the group registered with the worker: only a scheduler "
        "with the same --worker-group links it. Empty: the default group")
    progress_timeout: float = option(
        60.0, metavar="S",
        help="a step still running after this many seconds makes the worker NOT_SERVING "
             "(readiness and liveness) and takes it out of the registry, so its scheduler "
             "moves its requests to another worker; it rejoins once the step finishes")
    deployment: str = option(
        DEFAULT_DEPLOYMENT, metavar="NAME",
        help="the deployment's namespace in Redis (keys gridllm:NAME:*) the worker registers "
             "in: only that deployment's schedulers find it")
    # Mutual TLS: only clients (schedulers) with the CA's certificates reach the worker.
    tls: TlsOptions = field(default_factory=TlsOptions)

    def __post_init__(self) -> None:
        check_deployment(self.deployment)
        check_port(self.port)
        if self.metrics_port is not None:
            check_port(self.metrics_port, "metrics_port")
        require(self.heartbeat_ttl >= 1.0, "heartbeat_ttl", "must be at least 1 second",
                self.heartbeat_ttl)
        require(self.progress_timeout > 0, "progress_timeout", "must be positive",
                self.progress_timeout)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Runs the model runner's steps in one background thread, one stream at a time.

    Args:
        runner: a ModelRunner (or anything with ``execute_model_async`` and
            ``reset_requests``).
        info: the WorkerInfo to report (address filled in once bound).
    """

    def __init__(self, runner=None, info: worker_pb2.WorkerInfo | None = None):
        # Both are set once the model is loaded; calls before that get UNAVAILABLE.
        self.runner = runner
        self.info = info
        # The runner is not thread-safe; every call into it goes through this one thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-runner")
        self._lock = threading.Lock()
        self._active_stream = False
        self.num_steps = 0
        # When each step launched and not read back yet began (time.monotonic()), oldest
        # first. Written by the runner's thread, so a step stuck there is seen even if its
        # stream is gone.
        self._launch_times: collections.deque[float] = collections.deque()
        # Set on shutdown; the Step stream tells the scheduler.
        self.draining = asyncio.Event()
        # Per KV block: times handed out for new content (kept across streams, like the KV).
        self.block_versions: list[int] = [] if runner is None else [0] * runner.num_kv_blocks
        self.metrics = WorkerMetrics()

    def _reset_requests(self) -> None:
        with self._lock:
            self.runner.reset_requests()
            # Steps launched for a stream that ended are never read back.
            self._launch_times.clear()

    def _launch(self, scheduler_output) -> AsyncRunnerOutput:
        with self._lock:
            # The watchdog measures from the oldest step launched and not read back yet.
            self._launch_times.append(time.monotonic())
            return self.runner.execute_model_async(scheduler_output)

    def _read(self, pending: AsyncRunnerOutput) -> ModelRunnerOutput:
        with self._lock:
            try:
                return pending.get_output()
            finally:
                self._launch_times.popleft()

    def seconds_in_step(self) -> float:
        """How long the oldest step not answered yet has taken so far (0 between steps)."""
        try:
            return time.monotonic() - self._launch_times[0]
        except IndexError:
            return 0.0

    async def GetInfo(self, request, context):
        """Returns:
            The worker's identity, KV capacity and model limits.
        """
        if self.info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is loading its model")
        return self.info

    async def Step(self, request_iterator, context):
        """Answer each StepRequest with its StepResponse, in order.

        A step is queued on the runner as soon as it arrives, before the previous step's
        answer is read when the scheduler pipelines: the device runs step N+1 (fed with
        step N's samples on the device) while N's sampled ids are copied back and sent.

        Args:
            request_iterator: the scheduler's steps.
        Returns:
            One StepResponse per StepRequest, plus a drain notice (step_id 0) if the
            worker starts shutting down between steps; FAILED_PRECONDITION if another
            scheduler's stream is active.
        """
        if self.info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is loading its model")
        if self._active_stream:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"worker {self.info.worker_id} is driven by another scheduler")
        self._active_stream = True
        loop = asyncio.get_running_loop()
        # A new scheduler knows none of the old requests; the KV cache stays.
        await loop.run_in_executor(self._executor, self._reset_requests)
        logger.info("step stream opened by %s", context.peer())
        steps = request_iterator.__aiter__()
        drain = asyncio.ensure_future(self.draining.wait())
        next_step: asyncio.Future | None = None
        # Steps queued on the runner and not answered yet, oldest first.
        queued: collections.deque[_QueuedStep] = collections.deque()
        has_notified = False
        try:
            while True:
                if next_step is None:
                    next_step = asyncio.ensure_future(steps.__anext__())
                if queued:
                    oldest = queued[0]
                    if not (next_step.done() or oldest.output.is_ready()):
                        # Whichever comes first: the next step to queue, or this answer.
                        if oldest.ready is None:
                            oldest.ready = loop.run_in_executor(None, oldest.output.wait)
                        await asyncio.wait({next_step, oldest.ready},
                                           return_when=asyncio.FIRST_COMPLETED)
                    if not (next_step.done() and not _has_ended(next_step)
                            and len(queued) < _MAX_QUEUED_STEPS):
                        queued.popleft()
                        output = await loop.run_in_executor(self._executor, self._read,
                                                            oldest.output)
                        seconds = time.perf_counter() - oldest.start
                        self.metrics.on_step(seconds, oldest.num_tokens,
                                             oldest.num_new_requests)
                        response = runner_output_to_pb(output, oldest.step_id, seconds)
                        if oldest.step_id == 0:
                            response.block_versions.extend(self.block_versions)
                        if self.draining.is_set():
                            response.is_draining = has_notified = True
                        yield response
                        continue
                else:
                    waiting = {next_step} if has_notified else {next_step, drain}
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    if not next_step.done():
                        # Shutdown began between steps: tell the scheduler, keep serving.
                        has_notified = True
                        yield worker_pb2.StepResponse(step_id=0, is_draining=True)
                        continue
                try:
                    step = next_step.result()
                except StopAsyncIteration:
                    break
                next_step = None
                scheduler_output = scheduler_output_from_pb(step)
                for new in scheduler_output.scheduled_new_reqs:
                    logger.info("request %s: %d prompt tokens, %d computed already",
                                new.req_id, len(new.prompt_token_ids), new.num_computed_tokens,
                                extra={"request_id": unscoped(new.req_id)})
                # Counted before running: a failed step may have overwritten its blocks.
                bump_versions(self.block_versions, scheduler_output, self.runner.block_size)
                start = time.perf_counter()
                pending = await loop.run_in_executor(self._executor, self._launch,
                                                     scheduler_output)
                self.num_steps += 1
                queued.append(_QueuedStep(step.step_id, pending, start,
                                          scheduler_output.total_num_scheduled_tokens,
                                          len(scheduler_output.scheduled_new_reqs)))
        finally:
            for future in (drain, next_step, *(q.ready for q in queued)):
                if future is None:
                    continue
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: the stream's end is no error
            self._active_stream = False
            # Queued behind any step still running in the executor thread.
            try:
                await asyncio.shield(loop.run_in_executor(self._executor,
                                                          self._reset_requests))
            except RuntimeError:  # the executor is shut down: the worker is stopping
                pass
            logger.info("step stream closed")

    def begin_drain(self) -> None:
        """Ask the scheduler to send no new requests and close the stream when done."""
        self.draining.set()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def build_info(runner, model: str, worker_id: str, scheduler_config) -> worker_pb2.WorkerInfo:
    # Here, not at module level: the options above are read by CLIs that load no torch.
    from worker_svc.logits_processors import registered_logits_processors

    info = worker_pb2.WorkerInfo(
        worker_id=worker_id, model=model, num_kv_blocks=runner.num_kv_blocks,
        max_num_seqs=scheduler_config.max_num_seqs,
        max_num_batched_tokens=scheduler_config.max_num_batched_tokens,
        device=str(runner.device), dtype=str(getattr(runner, "dtype", "")).replace("torch.", ""),
        instance_id=uuid.uuid4().hex, logits_processors=registered_logits_processors(),
        model_config_hash=model_config_hash(
            getattr(runner, "hf_config", None),
            getattr(getattr(runner, "model_config", None), "sparse_attention", None)),
        quantization=served_quantization(getattr(runner, "model", None)),
        kv_cache_dtype=str(getattr(runner, "kv_cache_dtype", "")).replace("torch.", ""),
        kv_cache_scales=served_kv_cache_scales(runner))
    return model_limits_to_pb(runner.limits, info)


def served_quantization(model) -> str:
    """``"fp8"`` when the model holds FP8 linear layers (quantized at load, or an FP8
    checkpoint's), else empty."""
    from worker_svc.layers.quantization import Fp8Linear

    if model is not None and any(isinstance(m, Fp8Linear) for m in model.modules()):
        return "fp8"
    return ""


def served_kv_cache_scales(runner) -> str:
    """Where an FP8 KV cache's scales come from: ``"calculated"`` (calculate_kv_scales),
    ``"checkpoint"`` (a layer holds the checkpoint's calibrated scales), else empty."""
    import torch

    from kernels.fp8 import is_fp8

    cache_dtype = getattr(runner, "kv_cache_dtype", None)
    model = getattr(runner, "model", None)
    if model is None or not isinstance(cache_dtype, torch.dtype) or not is_fp8(cache_dtype):
        return ""
    if runner.cache_config.calculate_kv_scales:
        return "calculated"
    if any(getattr(m, "kv_scales", None) is not None for m in model.modules()):
        return "checkpoint"
    return ""


# Config entries that name where or how a model was saved, not what it computes.
_UNHASHED_CONFIG_KEYS = ("transformers_version", "torch_dtype", "dtype")


def model_config_hash(hf_config, sparse_attention: str | None = None) -> str:
    """A digest of the model's architecture config (empty without one): equal for the same
    model wherever it was loaded from, different for another architecture or size, or
    another attention pattern (``sparse_attention``: the outputs differ)."""
    if hf_config is None:
        return ""
    import hashlib

    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(vars(hf_config))
    kept = {k: v for k, v in config.items()
            if not k.startswith("_") and k not in _UNHASHED_CONFIG_KEYS}
    if sparse_attention:
        kept["gridllm_sparse_attention"] = sparse_attention
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def info_to_json(info: worker_pb2.WorkerInfo) -> str:
    from google.protobuf import json_format

    return json.dumps(json_format.MessageToDict(info, preserving_proto_field_name=True,
                                                always_print_fields_with_no_presence=True))


class Registration:
    """Keeps the worker's registry entry (``gridllm:<deployment>:worker:<id>``) alive in
    Redis while the worker serves.

    A heartbeat every third of the TTL; while Redis is unreachable, a retry every
    ``_RETRY_S``, so the entry is back moments after Redis is (a restarted Redis is empty).

    Args:
        redis_url: the Redis to register in.
        info: what to publish (with its address).
        ttl: seconds the entry outlives the last heartbeat.
        keys: the deployment's Redis keys.
    """

    def __init__(self, redis_url: str, info: worker_pb2.WorkerInfo, ttl: float,
                 keys: RedisKeys = DEFAULT_KEYS):
        self.redis_url = redis_url
        self.redis = async_redis(redis_url)
        self.key = keys.worker_key(info.worker_id)
        self.value = info_to_json(info)
        self.ttl = ttl
        self._task: asyncio.Task | None = None
        self._stopping = False
        # Wakes the loop early: to stop, or to beat at once after a pause.
        self._wakeup = asyncio.Event()
        # While paused no heartbeat is sent (the entry was removed): nobody routes here.
        self.is_paused = False

    async def start(self) -> None:
        """Register, waiting for Redis as long as it takes (it may be restarting); then
        keep the entry alive in the background."""
        await check_redis(self.redis, self.redis_url)
        is_warned = False
        while True:
            try:
                await self._beat()
                break
            except Exception as exc:  # noqa: BLE001 - Redis down: not ready until it is back
                if not is_warned:
                    logger.warning("cannot register in Redis (%s); retrying every %.1fs",
                                   exc, _RETRY_S)
                    is_warned = True
                await asyncio.sleep(_RETRY_S)
        if is_warned:
            logger.info("registered in Redis")
        self._task = asyncio.create_task(self._loop(), name="registration")

    async def _beat(self) -> None:
        await self.redis.set(self.key, self.value, px=int(self.ttl * 1000))

    async def _loop(self) -> None:
        is_failing = False
        while True:
            interval = min(_RETRY_S, self.ttl / 3) if is_failing else self.ttl / 3
            await wait_or_stop(self._wakeup, interval)
            self._wakeup.clear()
            if self._stopping:
                return
            if self.is_paused:
                continue
            try:
                await self._beat()
                if self.is_paused:  # paused while the beat was on its way: undo it
                    await self.redis.delete(self.key)
            except Exception as exc:  # noqa: BLE001 - Redis hiccups must not kill the worker
                if not is_failing:
                    logger.warning("heartbeat to Redis failed (%s); retrying every %.1fs",
                                   exc, min(_RETRY_S, self.ttl / 3))
                is_failing = True
                continue
            if is_failing:
                logger.info("heartbeat to Redis restored")
                is_failing = False

    async def pause(self) -> None:
        """Leave the registry (best effort) and send no heartbeat until ``resume()``."""
        self.is_paused = True
        try:
            await self.redis.delete(self.key)
        except Exception as exc:  # noqa: BLE001 - the entry then expires with its TTL
            logger.warning("could not remove the registry entry: %s", exc)

    def resume(self) -> None:
        """Register again at once."""
        self.is_paused = False
        self._wakeup.set()

    async def stop(self) -> None:
        """Stop the heartbeat and remove the registry entry."""
        self._stopping = True
        if self._task is not None:
            await stop_tasks([self._task], self._wakeup)
        try:
            await self.redis.delete(self.key)
        finally:
            await self.redis.aclose()


class WorkerServer:
    """Builds the runner, serves the Worker service and registers it.

    Args:
        model_config, cache_config, scheduler_config: as for ModelRunner.
        options: addresses, id and registry settings.
        runner: an already built runner (tests); None builds one from the configs.
    """

    def __init__(self, model_config, cache_config, scheduler_config,
                 options: WorkerOptions | None = None, runner=None):
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.options = options or WorkerOptions()
        self.worker_id = self.options.worker_id or uuid.uuid4().hex[:12]
        self.runner = runner
        self.service = ServiceServer([SERVICE_NAME],
                                     credentials=server_credentials(self.options.tls))
        self.servicer = WorkerServicer()
        # Registered before start: gRPC fixes its method table when the server starts.
        worker_pb2_grpc.add_WorkerServicer_to_server(self.servicer, self.service.server)
        self.registration: Registration | None = None
        self.address = ""
        # Serving /metrics (None without --metrics-port); metrics_port is its bound port.
        self.metrics_server: HttpServer | None = None
        self.metrics_port = 0
        self.watchdog = ProgressWatchdog(self.servicer.seconds_in_step,
                                         self.options.progress_timeout, self._on_stall)

    async def start(self) -> str:
        """Bind, load the model (health NOT_SERVING meanwhile), register, then SERVING.
        Liveness is SERVING from the start (loading is progress), until a step stalls.

        Returns:
            The advertised address (host:port).
        """
        opts = self.options
        if opts.redis_url:
            # Wrong credentials end the start before minutes of model loading, not after.
            probe = async_redis(opts.redis_url)
            try:
                await check_redis(probe, opts.redis_url)
            finally:
                await probe.aclose()
        port = await self.service.start(f"{opts.host}:{opts.port}")
        self.address = advertised_address(opts.host, opts.advertise_host, port)
        if opts.metrics_port is not None:
            self.metrics_server = await serve_metrics(self.servicer.metrics.registry, opts.host,
                                                      opts.metrics_port)
            self.metrics_port = self.metrics_server.port
        if self.runner is None:
            from worker_svc.ranks.launch import build_runner

            loop = asyncio.get_running_loop()
            # Loading takes seconds to minutes; keep answering health checks meanwhile.
            # With tensor_parallel_size > 1 this process is rank 0 and starts the others.
            self.runner = await loop.run_in_executor(None, lambda: build_runner(
                self.model_config, self.cache_config, self.scheduler_config,
                on_rank_lost=self._on_rank_lost))
        info = build_info(self.runner, self.model_config.model, self.worker_id,
                          self.scheduler_config)
        info.address = self.address
        info.worker_group = opts.worker_group
        self.servicer.block_versions = [0] * self.runner.num_kv_blocks
        self.servicer.metrics.num_kv_blocks.set(self.runner.num_kv_blocks)
        self.servicer.metrics.set_info(info)
        self.servicer.runner, self.servicer.info = self.runner, info
        if opts.redis_url:
            # Not ready before it is registered: no scheduler could find it.
            self.registration = Registration(opts.redis_url, info, opts.heartbeat_ttl,
                                             RedisKeys(opts.deployment))
            await self.registration.start()
        await self.service.set_serving(True)
        self.watchdog.start()
        logger.info("worker %s serving %s at %s (%d KV blocks of %d tokens)", self.worker_id,
                    self.model_config.model, self.address, info.num_kv_blocks, info.block_size)
        return self.address

    async def _on_stall(self, is_stalled: bool) -> None:
        # Out of the registry, the worker is taken for lost by its scheduler (which then
        # resumes its requests elsewhere) once its heartbeat would have expired.
        await self.service.set_serving(not is_stalled)
        await self.service.set_live(not is_stalled)
        if self.registration is not None:
            if is_stalled:
                await self.registration.pause()
            else:
                self.registration.resume()

    async def stop(self, grace: float | None = 5.0) -> None:
        """Deregister, then drain the Step stream within ``grace`` seconds.

        The scheduler is told to send no new requests; it closes the stream once the
        running ones finished (or the grace period cancels them).
        """
        await self._deregister()
        await self.service.stop(grace)
        await self._close()

    async def serve_until_signal(self, grace: float = 5.0) -> None:
        """Serve until SIGTERM: deregister, drain the Step stream, release the runner."""
        await self.service.serve_until_signal(grace, before_stop=self._deregister,
                                              on_stop=self._close)

    async def _deregister(self) -> None:
        await self.watchdog.stop()
        self.servicer.begin_drain()
        if self.registration is not None:
            await self.registration.stop()
            self.registration = None

    async def _close(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.stop(1.0)
        self.servicer.close()
        shutdown = getattr(self.runner, "shutdown", None)
        if shutdown is not None:
            shutdown()  # the other tensor-parallel ranks

    def _on_rank_lost(self, what: str) -> None:
        """A tensor-parallel rank died (the others are killed already): no step can run,
        so the worker exits at once. Its Step stream breaks and the scheduler moves the
        requests to another worker (or fails them with UNAVAILABLE)."""
        logger.critical("%s; worker %s exits", what, self.worker_id)
        if self.options.redis_url:
            _delete_registration(self.options.redis_url,
                                 RedisKeys(self.options.deployment).worker_key(self.worker_id))
        logging.shutdown()
        os._exit(EXIT_RANK_LOST)


def _delete_registration(redis_url: str, key: str) -> None:
    """Best effort, bounded: a dead worker's entry would otherwise outlive it by its TTL."""
    import redis

    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=1.0,
                                      socket_connect_timeout=1.0)
        client.delete(key)
        client.close()
    except Exception as exc:  # noqa: BLE001 - exiting anyway
        logger.warning("could not remove the registry entry: %s", exc)
