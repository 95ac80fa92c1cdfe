"""The router: the public ``gridllm.v1.Generation`` service in front of the schedulers.

It validates and tokenizes requests (chat templates too), picks a scheduler, detokenizes the
streamed token ids incrementally, applies stop strings, turns client cancellation and
deadlines into aborts upstream (over its Session stream to that scheduler), and resubmits
prompt + tokens so far when its scheduler dies mid-stream. It keeps no state beyond the
requests in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from gridllm.common.auth import warn_if_open
from gridllm.common.cli_args import option, parse_size
from gridllm.common.config import DEFAULT_ROUTER_PORT, check_port, require
from gridllm.common.contract import ModelLimits
from gridllm.common.convert import model_limits_to_pb
from gridllm.common.grpc_utils import ServiceServer
from gridllm.common.http_server import HttpServer
from gridllm.common.redis_client import async_redis, check_redis
from gridllm.common.redis_keys import DEFAULT_DEPLOYMENT, RedisKeys, check_deployment
from gridllm.common.routing_policy import POLICY_NAMES, make_policy
from gridllm.common.tls import TlsOptions, server_credentials
from gridllm.v1 import generate_pb2, generate_pb2_grpc
from router.auth import RouterAuth
from router.engine_client import (
    DEFAULT_MAX_REQUEST_BYTES,
    RETRY_AFTER_KEY,
    SCHEDULER_STREAMS,
    EngineClient,
    RequestFailure,
    deadline_after,
)
from router.kv_api import KvApiError, get_loads, subscribe_kv_events
from router.kv_index import KvIndexFollower
from router.metrics import RouterMetrics
from router.responses import generate_response
from router.routing import PrefixIndex, SchedulerPool
from router.validation import render_chat, tokenize_text

logger = logging.getLogger(__name__)

SERVICE_NAME = "gridllm.v1.Generation"
# Kept for callers of the former name: the request path's failure.
RpcFailure = RequestFailure


async def _abort(context: grpc.aio.ServicerContext, failure: RequestFailure) -> None:
    metadata = (() if failure.retry_after_ms is None
                else ((RETRY_AFTER_KEY, str(failure.retry_after_ms)),))
    await context.abort(failure.code, failure.details, trailing_metadata=metadata)


@dataclass
class RouterOptions:
    model: str = option(help="model name or path the workers serve (its tokenizer is loaded)")
    tokenizer: str | None = option(None, default_help="the model's",
                                   help="tokenizer directory")
    served_model_name: str | None = option(
        None, default_help="--model",
        help="model name GetModelInfo and the HTTP API's /v1/models report to clients")
    scheduler_addresses: list[str] = option(
        default_factory=list, flag="--scheduler", metavar="HOST:PORT",
        help="a scheduler to route to (repeatable); none: discover the schedulers "
             "registered in --redis-url")
    redis_url: str | None = option(
        None, help="Redis with the prefix-hash index (cache-aware routing) and the "
                   "scheduler registry")
    host: str = option("127.0.0.1", help="address to bind")
    port: int = option(DEFAULT_ROUTER_PORT, help="port to bind; 0 picks a free one")
    http_port: int | None = option(
        None, default_help="none: gRPC only",
        help="port of the OpenAI-compatible HTTP API, /metrics, /health and /ready (same "
             "host); 0 picks a free one")
    scheduler_wait_s: float = option(
        60.0, flag="--scheduler-wait", metavar="S",
        help="seconds a request in flight waits for a scheduler after its own died (then "
             "UNAVAILABLE); a new request never waits: UNAVAILABLE at once while no "
             "scheduler with a live worker is reachable")
    max_resubmits: int = option(
        3, help="resubmissions of one request after scheduler failures before giving up")
    max_num_streams: int = option(
        4096, help="most requests the router serves at once (gRPC and HTTP); past it a new "
        "one gets RESOURCE_EXHAUSTED / 429 with a retry hint (instead of queueing inside gRPC, "
        "which cancels calls it held too long)")
    max_request_bytes: int = option(
        DEFAULT_MAX_REQUEST_BYTES, is_size=True, help="largest request (and response) message "
        "the router takes; a larger one gets RESOURCE_EXHAUSTED before it is read (an HTTP "
        "body: 413)")
    routing_policy: str = option(
        "cache_aware", choices=POLICY_NAMES,
        help="how a scheduler is picked: cache_aware (prefix-cache overlap against load), "
        "least_load, or round_robin")
    deployment: str = option(
        DEFAULT_DEPLOYMENT, metavar="NAME",
        help="the deployment's namespace in Redis (keys gridllm:NAME:*): only its schedulers "
             "and caches are seen")
    # TLS on the public gRPC and HTTP APIs, mutual TLS to the schedulers.
    tls: TlsOptions = field(default_factory=TlsOptions)
    max_concurrent_streams: int = option(
        1024, help="most streams one client connection holds open at once (HTTP/2 "
        "SETTINGS_MAX_CONCURRENT_STREAMS); a client's further calls wait for a free one")
    api_keys: list[str] = option(
        default_factory=list, flag="--api-key", metavar="KEY",
        help="an API key clients send as `authorization: Bearer KEY` (repeatable; also "
             "$GRIDLLM_API_KEY); none given anywhere: no key is asked")
    api_key_file: str | None = option(
        None, metavar="PATH", help="API keys, one `KEY [TENANT]` per line (KEY may be "
        "sha256:<hex digest>)")
    auth_health: bool = option(False, help="ask a key for gRPC health and HTTP /health, "
                                           "/ready too (probes then need one)")
    auth_reflection: bool = option(False, help="ask a key for gRPC server reflection too")
    auth_metrics: bool = option(False, help="ask a key for HTTP /metrics too")
    scheduler_stream: str = option(
        "session", choices=SCHEDULER_STREAMS, help="how requests travel to a scheduler: "
        "session (one stream per scheduler carries all of them, one message per step for "
        "all) or submit (a call per request, as a router before sessions did)")

    def __post_init__(self) -> None:
        check_deployment(self.deployment)
        require(bool(self.model), "model", "must be a non-empty name or path", self.model)
        check_port(self.port)
        if self.http_port is not None:
            check_port(self.http_port, "http_port")
        require(self.scheduler_wait_s > 0, "scheduler_wait_s", "must be positive",
                self.scheduler_wait_s)
        require(self.max_resubmits >= 0, "max_resubmits", "must be non-negative",
                self.max_resubmits)
        require(self.max_num_streams >= 1, "max_num_streams", "must be at least 1",
                self.max_num_streams)
        self.max_request_bytes = parse_size(self.max_request_bytes, "max_request_bytes")
        require(self.max_request_bytes >= 1024, "max_request_bytes", "must be at least 1KiB",
                self.max_request_bytes)
        require(self.routing_policy in POLICY_NAMES, "routing_policy",
                f"must be one of {POLICY_NAMES}", self.routing_policy)
        require(self.max_concurrent_streams >= 1, "max_concurrent_streams",
                "must be at least 1", self.max_concurrent_streams)
        require(self.scheduler_stream in SCHEDULER_STREAMS, "scheduler_stream",
                f"must be one of {SCHEDULER_STREAMS}", self.scheduler_stream)

    @property
    def model_name(self) -> str:
        """The name clients see."""
        return self.served_model_name or self.model


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    """The public API.

    Args:
        tokenizer: the model's transformers tokenizer (None: token-id prompts only).
        eos_token_ids: the first is sent as the request's EOS, the rest as extra stop ids.
        pool: the schedulers.
        options: RouterOptions.
        engine: the request path (shared with the HTTP front); None: one of its own.
        redis: the KV event log's Redis (None: SubscribeKvEvents is refused).
        is_draining: whether the router is shutting down (new requests are refused).
    """

    def __init__(self, tokenizer: Any | None, eos_token_ids: list[int], pool: SchedulerPool,
                 options: RouterOptions, engine: EngineClient | None = None,
                 redis: Any | None = None, is_draining: Callable[[], bool] = lambda: False):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.pool = pool
        self.options = options
        self.redis = redis
        self.is_draining = is_draining
        self.engine = engine or EngineClient(tokenizer, eos_token_ids, pool,
                                             options.scheduler_wait_s, options.max_resubmits,
                                             max_num_streams=options.max_num_streams,
                                             scheduler_stream=options.scheduler_stream)

    def close(self) -> None:
        """Stop the request path's tokenizing threads."""
        self.engine.close()

    # ----------------------------------------------------------------- Generate
    async def Generate(self, request: generate_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """Stream one request's completion(s); ValueError -> INVALID_ARGUMENT naming the field,
        RESOURCE_EXHAUSTED (with a retry hint) past max_num_streams or a scheduler's queue.

        UNAVAILABLE at once while the router drains or no scheduler with a live worker is
        reachable; a request in flight whose scheduler dies waits up to ``scheduler_wait_s``
        for one to resume on.
        """
        if self.is_draining():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the router is shutting down")
        deadline = deadline_after(context.time_remaining())
        try:
            with self.engine.stream_slot():
                validated = await self.engine.validate(request, deadline)
                async for delta in self.engine.generate(validated, deadline, "grpc"):
                    response = generate_response(validated.request_id, delta,
                                                 validated.return_token_ids)
                    if response is not None:
                        yield response
        except RequestFailure as failure:
            await _abort(context, failure)

    async def _limits(self, context: grpc.aio.ServicerContext) -> ModelLimits:
        try:
            return await self.engine.model_limits(deadline_after(context.time_remaining()))
        except RequestFailure as failure:
            await _abort(context, failure)
            raise  # not reached: abort raises

    # ----------------------------------------------------------------- small RPCs
    async def Tokenize(self, request: generate_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> generate_pb2.TokenizeResponse:
        """Token ids of text or chat messages (INVALID_ARGUMENT if neither is set)."""
        kind = request.WhichOneof("input")
        add_special = (request.add_special_tokens if request.HasField("add_special_tokens")
                       else True)
        if kind not in ("text", "chat"):
            raise ValueError("input must be set: text or chat.")
        # Tokenizing needs no scheduler; with one known, a text that cannot fit is refused.
        info = self.pool.any_info()
        max_model_len = info.max_model_len if info is not None else None
        if kind == "text":
            ids = await self.engine.off_loop(lambda tokenizer: tokenize_text(
                tokenizer, request.text, add_special, "text", max_model_len))
        else:
            ids = await self.engine.off_loop(lambda tokenizer: render_chat(
                tokenizer, request.chat, "chat", max_model_len))
        return generate_pb2.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(self, request: generate_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext
                           ) -> generate_pb2.GetModelInfoResponse:
        """The served model (UNAVAILABLE until a scheduler with workers answered)."""
        limits = await self._limits(context)
        if self.eos_token_ids:
            # The router's tokenizer decides what ends a request it sends.
            limits = dataclasses.replace(limits, eos_token_id=self.eos_token_ids[0])
        return model_limits_to_pb(
            limits, generate_pb2.GetModelInfoResponse(model=self.options.model_name))

    async def GetServerStats(self, request: generate_pb2.GetServerStatsRequest,
                             context: grpc.aio.ServicerContext
                             ) -> generate_pb2.GetServerStatsResponse:
        """Sum of every reachable scheduler's GetStats."""
        replies = await asyncio.gather(
            *(link.stub.GetStats(generate_pb2.GetServerStatsRequest(), timeout=2.0)
              for link in self.pool.links), return_exceptions=True)
        total = generate_pb2.GetServerStatsResponse()
        for reply in replies:
            if isinstance(reply, BaseException):
                continue
            total.num_requests_running += reply.num_requests_running
            total.num_requests_waiting += reply.num_requests_waiting
            total.prefix_cache_queries += reply.prefix_cache_queries
            total.prefix_cache_hits += reply.prefix_cache_hits
            total.num_workers_alive += reply.num_workers_alive
            total.num_preemptions += reply.num_preemptions
            total.workers.extend(reply.workers)
            total.num_schedulers += 1
        return total

    async def SubscribeKvEvents(self, request: generate_pb2.SubscribeKvEventsRequest,
                                context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[generate_pb2.SubscribeKvEventsResponse]:
        """Every scheduler's KV events in sequence order, replayed from
        ``start_sequence_number`` when given, then live (router.kv_api)."""
        try:
            async for response in subscribe_kv_events(self.redis, request,
                                                      RedisKeys(self.options.deployment)):
                yield response
        except KvApiError as error:
            await context.abort(error.code, error.details)

    async def GetLoads(self, request: generate_pb2.GetLoadsRequest,
                       context: grpc.aio.ServicerContext) -> generate_pb2.GetLoadsResponse:
        """Running, waiting, KV usage and hit rate of every scheduler and worker."""
        return await get_loads(self.pool.links, self.pool.mark_down)


def load_router_tokenizer(model: str, tokenizer: str | None) -> tuple[Any | None, list[int]]:
    """The tokenizer and EOS ids (as ``LLM`` derives them) of a model path or preset."""
    from gridllm.common.presets import resolve_model
    from gridllm.common.tokenizer import eos_token_ids, load_tokenizer

    path = resolve_model(model)
    model_dir = path if os.path.isdir(path) else None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif model_dir is not None:
        tok = load_tokenizer(model_dir)
    elif path.endswith(".gguf") and os.path.isfile(path):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.dirname(path),
                                            gguf_file=os.path.basename(path))
    else:
        tok = None
    hf_config = None
    if model_dir is not None and os.path.isfile(os.path.join(model_dir, "config.json")):
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(model_dir)
    return tok, eos_token_ids(tok, hf_config, model_dir)


async def _track_health(pool: SchedulerPool, server: ServiceServer) -> None:
    """Readiness follows the pool: SERVING exactly while a scheduler with a live worker
    answers.

    A function, not a method: the frame of a cancelled task outlives it in the task's
    traceback, and a frame holding the RouterServer would make a reference cycle that keeps
    the gRPC server alive past its event loop.
    """
    is_serving = False
    while True:
        pool.availability_changed.clear()
        if pool.is_available != is_serving:
            is_serving = pool.is_available
            await server.set_serving(is_serving)
            if is_serving:
                logger.info("router is serving")
            else:
                logger.warning("router is NOT_SERVING: no scheduler with a live worker")
        await pool.availability_changed.wait()


class RouterServer:
    """The router process: server + scheduler pool (+ Redis for cache-aware routing).

    Args:
        options: what to serve, where, and the schedulers to route to.
    Raises:
        ValueError: neither schedulers nor a Redis to discover them in.
    """

    def __init__(self, options: RouterOptions):
        if not options.scheduler_addresses and not options.redis_url:
            raise ValueError("scheduler_addresses or redis_url must be given: --scheduler "
                             "HOST:PORT (repeatable), or --redis-url to discover schedulers.")
        self.options = options
        self.tokenizer, self.eos_token_ids = load_router_tokenizer(options.model,
                                                                   options.tokenizer)
        self.scheduler_addresses = list(options.scheduler_addresses)
        self.redis_url = options.redis_url
        self.auth = RouterAuth.from_options(
            options.api_keys, options.api_key_file, options.auth_health,
            options.auth_reflection, options.auth_metrics)
        # Clients authenticate with API keys, not certificates: TLS only, no client cert.
        self.server = ServiceServer(
            [SERVICE_NAME], max_message_bytes=self.options.max_request_bytes,
            options=[("grpc.max_concurrent_streams", options.max_concurrent_streams)],
            credentials=server_credentials(options.tls, False),
            interceptors=[self.auth.grpc_interceptor()])
        self.pool: SchedulerPool | None = None
        self.kv_follower: KvIndexFollower | None = None
        self.engine: EngineClient | None = None
        self._redis: Any = None
        self._health_task: asyncio.Task | None = None
        self.metrics = RouterMetrics()
        # The OpenAI-compatible API (None without --http-port); http_port is its bound port.
        self.http: HttpServer | None = None
        self.http_port = 0
        self._http_drain: asyncio.Task | None = None

    async def start(self, address: str | None = None) -> int:
        """Bind (``address``, default the options' host:port) and start. Readiness is
        SERVING while a scheduler with a live worker answers; liveness from the start.

        Returns:
            The bound port.
        """
        keys = RedisKeys(self.options.deployment)
        if self.redis_url:
            self._redis = async_redis(self.redis_url)
            await check_redis(self._redis, self.redis_url)
            self.kv_follower = KvIndexFollower(self._redis, keys=keys)
            self.kv_follower.start()
        self.pool = SchedulerPool(self.scheduler_addresses,
                                  PrefixIndex(self._redis, self.kv_follower, keys),
                                  policy=make_policy(self.options.routing_policy),
                                  tls=self.options.tls)
        engine = self.engine = EngineClient(
            self.tokenizer, self.eos_token_ids, self.pool, self.options.scheduler_wait_s,
            self.options.max_resubmits, self.metrics, self.options.max_num_streams,
            self.options.scheduler_stream)
        servicer = GenerationServicer(self.tokenizer, self.eos_token_ids, self.pool, self.options,
                                      engine, self._redis, self.server.draining.is_set)
        generate_pb2_grpc.add_GenerationServicer_to_server(servicer, self.server.server)
        warn_if_open(self.options.host, self.auth.keyring, "the router")
        port = await self.server.start(address or f"{self.options.host}:{self.options.port}")
        if self.options.http_port is not None:
            await self._start_http(engine)
        self.pool.start()
        self._health_task = asyncio.create_task(_track_health(self.pool, self.server),
                                                name="router-health")
        logger.info("router listening on port %d, schedulers %s", port, self.scheduler_addresses)
        return port

    async def _start_http(self, engine: EngineClient) -> None:
        from router.http_api import HttpApi

        pool = self.pool
        assert pool is not None
        api = HttpApi(engine, self.options.model_name, [self.options.model], self.metrics,
                      is_ready=lambda: bool(pool.alive()), auth=self.auth,
                      max_request_bytes=self.options.max_request_bytes)
        tls = self.options.tls
        self.http = HttpServer(api.asgi(), self.options.host, self.options.http_port or 0,
                               "router-http", ssl=tls.uvicorn_kwargs() if tls.is_enabled else None)
        self.http_port = await self.http.start()
        logger.info("router HTTP API (OpenAI-compatible) at %s://%s:%d/v1",
                    "https" if tls.is_enabled else "http", self.options.host, self.http_port)

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
            self._health_task = None
        if self.http is not None:
            await self.http.stop(0.0)
        if self._http_drain is not None:
            await self._http_drain
        if self.pool is not None:
            await self.pool.close()
        if self.kv_follower is not None:
            await self.kv_follower.close()
        if self.engine is not None:
            self.engine.close()
        if self._redis is not None:
            await self._redis.aclose()

    async def serve_until_signal(self, grace: float) -> None:
        await self.server.serve_until_signal(grace, on_stop=self.stop,
                                             before_stop=lambda: self._drain_http(grace),
                                             in_flight=self._num_streams)

    def _num_streams(self) -> int:
        # Both fronts' requests: the HTTP front drains alongside, so waiting for its
        # streams too keeps the gRPC transport up no longer than the grace allows.
        return self.engine.num_streams if self.engine is not None else 0

    async def _drain_http(self, grace: float) -> None:
        # Stops accepting now and drains alongside the gRPC streams (not after them).
        if self.http is not None:
            http, self.http = self.http, None
            self._http_drain = asyncio.create_task(http.stop(grace))
