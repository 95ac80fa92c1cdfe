"""The router: the public ``gridllm.v1.Generation`` service in front of the schedulers.

It validates and tokenizes requests (chat templates too), picks a scheduler, detokenizes the
streamed token ids incrementally, applies stop strings, turns client cancellation and
deadlines into aborts upstream (by cancelling the Submit call), and resubmits prompt + tokens
so far when its scheduler dies mid-stream. It keeps no state beyond the requests in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from gridllm.common.cli_args import option
from gridllm.common.completion import CompletionState
from gridllm.common.config import DEFAULT_ROUTER_PORT, check_port, require
from gridllm.common.contract import ModelLimits
from gridllm.common.convert import (
    model_limits_from_pb,
    model_limits_to_pb,
    request_update_from_pb,
    sampling_params_to_pb,
)
from gridllm.common.grpc_utils import ServiceServer
from gridllm.common.output_processor import Child, fan_out
from gridllm.common.redis_client import async_redis
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import generate_pb2, generate_pb2_grpc, scheduler_pb2
from router.responses import generate_response
from router.routing import NoSchedulerError, PrefixIndex, SchedulerLink, SchedulerPool
from router.validation import (
    ValidatedRequest,
    render_chat,
    tokenize_text,
    validate_request,
)

logger = logging.getLogger(__name__)

SERVICE_NAME = "gridllm.v1.Generation"
# Status codes of a Submit stream that mean "the scheduler went away", not "the request is bad".
_RESUBMIT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                   grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL)


class RpcFailure(Exception):
    """Ends a client call with ``code`` (raised inside completions, aborted by the handler)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass
class RouterOptions:
    model: str = option(help="model name or path the workers serve (its tokenizer is loaded)")
    tokenizer: str | None = option(None, default_help="the model's",
                                   help="tokenizer directory")
    served_model_name: str | None = option(
        None, default_help="--model", help="model name GetModelInfo reports to clients")
    scheduler_addresses: list[str] = option(
        default_factory=list, flag="--scheduler", metavar="HOST:PORT",
        help="a scheduler to route to (repeatable); none: discover the schedulers "
             "registered in --redis-url")
    redis_url: str | None = option(
        None, help="Redis with the prefix-hash index (cache-aware routing) and the "
                   "scheduler registry")
    host: str = option("127.0.0.1", help="address to bind")
    port: int = option(DEFAULT_ROUTER_PORT, help="port to bind; 0 picks a free one")
    scheduler_wait_s: float = option(
        60.0, flag="--scheduler-wait", metavar="S",
        help="seconds a request in flight waits for a scheduler after its own died (then "
             "UNAVAILABLE); a new request never waits: UNAVAILABLE at once while no "
             "scheduler with a live worker is reachable")
    max_resubmits: int = option(
        3, help="resubmissions of one request after scheduler failures before giving up")

    def __post_init__(self) -> None:
        require(bool(self.model), "model", "must be a non-empty name or path", self.model)
        check_port(self.port)
        require(self.scheduler_wait_s > 0, "scheduler_wait_s", "must be positive",
                self.scheduler_wait_s)
        require(self.max_resubmits >= 0, "max_resubmits", "must be non-negative",
                self.max_resubmits)

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
        is_draining: whether the router is shutting down (new requests are refused).
    """

    def __init__(self, tokenizer: Any | None, eos_token_ids: list[int], pool: SchedulerPool,
                 options: RouterOptions, is_draining: Callable[[], bool] = lambda: False):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.pool = pool
        self.options = options
        self.is_draining = is_draining

    # ----------------------------------------------------------------- Generate
    async def Generate(self, request: generate_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """Stream one request's completion(s); ValueError -> INVALID_ARGUMENT naming the field.

        UNAVAILABLE at once while the router drains or no scheduler with a live worker is
        reachable; a request in flight whose scheduler dies waits up to ``scheduler_wait_s``
        for one to resume on.
        """
        if self.is_draining():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the router is shutting down")
        limits = await self._limits(context)
        validated = validate_request(request, self.tokenizer, limits)
        children = fan_out(validated.request_id, validated.sampling_params)
        try:
            if len(children) == 1:
                async for response in self._complete(validated, children[0], context):
                    yield response
            else:
                async for response in self._complete_n(validated, children, context):
                    yield response
        except RpcFailure as failure:
            await context.abort(failure.code, failure.details)

    async def _complete_n(self, validated: ValidatedRequest, children: list[Child],
                          context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def run(child: Child) -> None:
            try:
                async for response in self._complete(validated, child, context):
                    await queue.put(response)
                await queue.put(done)
            except Exception as exc:  # noqa: BLE001 - re-raised by the merging loop
                await queue.put(exc)

        tasks = [asyncio.create_task(run(child)) for child in children]
        try:
            remaining = len(children)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _complete(self, validated: ValidatedRequest, child: Child,
                        context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """One completion; survives scheduler deaths by resubmitting prompt + tokens so far."""
        prompt_ids = validated.prompt_token_ids
        state = CompletionState(self.tokenizer, prompt_ids, child.params, child.index)
        for attempt in range(self.options.max_resubmits + 1):
            # A new request is refused at once without a scheduler; one whose scheduler
            # died is held for it to come back (or another to take over).
            link = await self._pick(prompt_ids + state.token_ids, context,
                                    self.options.scheduler_wait_s if attempt else 0.0)
            call = link.stub.Submit(self._submit_request(validated, child.req_id, attempt,
                                                         child.params, state.token_ids),
                                    timeout=context.time_remaining())
            link.num_inflight += 1
            # Finished upstream (the scheduler freed the request), not here by a stop string.
            is_upstream_done = False
            try:
                async for msg in call:
                    update = request_update_from_pb(msg)
                    is_upstream_done = update.finished
                    delta = state.process(update)
                    response = generate_response(validated.request_id, delta,
                                                 validated.return_token_ids)
                    if response is not None:
                        yield response
                    if delta.finished:
                        return
            except grpc.aio.AioRpcError as exc:
                self._raise_unless_resubmittable(exc, link, attempt)
            finally:
                link.num_inflight -= 1
                if not is_upstream_done:
                    # Client cancel, deadline, stop string, or failure: abort it upstream.
                    call.cancel()
            logger.warning("request %s lost its scheduler %s after %d tokens; resubmitting",
                           child.req_id, link.address, len(state.token_ids))
        raise RpcFailure(grpc.StatusCode.UNAVAILABLE,
                         f"request {child.req_id} failed after {self.options.max_resubmits} "
                         "resubmissions: schedulers keep failing")

    def _raise_unless_resubmittable(self, exc: grpc.aio.AioRpcError, link: SchedulerLink,
                                    attempt: int) -> None:
        code = exc.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise ValueError(exc.details())
        if code not in _RESUBMIT_CODES:
            raise RpcFailure(code, exc.details() or code.name)
        self.pool.mark_down(link)
        if attempt >= self.options.max_resubmits:
            raise RpcFailure(code, f"scheduler failed: {exc.details()}")

    async def _pick(self, token_ids: list[int], context: grpc.aio.ServicerContext,
                    wait_s: float) -> SchedulerLink:
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, remaining)
        try:
            return await self.pool.pick(token_ids, wait_s)
        except NoSchedulerError as exc:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry later") from None

    def _submit_request(self, validated: ValidatedRequest, sub_id: str, attempt: int,
                        params: SamplingParams, generated: list[int]
                        ) -> scheduler_pb2.SubmitRequest:
        if generated:
            # Resumed: prompt logprobs were sent already, with the first response.
            params = params.clone(prompt_logprobs=None)
        request = scheduler_pb2.SubmitRequest(
            # A fresh id per attempt: a restarted scheduler may still hold the old one.
            request_id=sub_id if attempt == 0 else f"{sub_id}~{attempt}",
            prompt_token_ids=validated.prompt_token_ids,
            # What was generated resumes as output: max_tokens, min_tokens and the
            # penalties see it as an uninterrupted run does.
            output_token_ids=generated,
            sampling_params=sampling_params_to_pb(params), priority=validated.priority,
            extra_stop_token_ids=self.eos_token_ids[1:])
        if self.eos_token_ids:
            request.eos_token_id = self.eos_token_ids[0]
        return request

    async def _limits(self, context: grpc.aio.ServicerContext) -> ModelLimits:
        info = self.pool.any_info()
        if info is None:
            try:
                await self._pick([], context, 0.0)
            except RpcFailure as failure:
                await context.abort(failure.code, failure.details)
            info = self.pool.any_info()
        assert info is not None
        return model_limits_from_pb(info)

    # ----------------------------------------------------------------- small RPCs
    async def Tokenize(self, request: generate_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> generate_pb2.TokenizeResponse:
        """Token ids of text or chat messages (INVALID_ARGUMENT if neither is set)."""
        kind = request.WhichOneof("input")
        add_special = (request.add_special_tokens if request.HasField("add_special_tokens")
                       else True)
        if kind == "text":
            ids = tokenize_text(self.tokenizer, request.text, add_special, "text")
        elif kind == "chat":
            ids = render_chat(self.tokenizer, request.chat, "chat")
        else:
            raise ValueError("input must be set: text or chat.")
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
        self.server = ServiceServer([SERVICE_NAME])
        self.pool: SchedulerPool | None = None
        self._redis: Any = None
        self._health_task: asyncio.Task | None = None

    async def start(self, address: str | None = None) -> int:
        """Bind (``address``, default the options' host:port) and start. Readiness is
        SERVING while a scheduler with a live worker answers; liveness from the start.

        Returns:
            The bound port.
        """
        if self.redis_url:
            self._redis = async_redis(self.redis_url)
        self.pool = SchedulerPool(self.scheduler_addresses, PrefixIndex(self._redis))
        servicer = GenerationServicer(self.tokenizer, self.eos_token_ids, self.pool, self.options,
                                      is_draining=self.server.draining.is_set)
        generate_pb2_grpc.add_GenerationServicer_to_server(servicer, self.server.server)
        port = await self.server.start(address or f"{self.options.host}:{self.options.port}")
        self.pool.start()
        self._health_task = asyncio.create_task(_track_health(self.pool, self.server),
                                                name="router-health")
        logger.info("router listening on port %d, schedulers %s", port, self.scheduler_addresses)
        return port

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
            self._health_task = None
        if self.pool is not None:
            await self.pool.close()
        if self._redis is not None:
            await self._redis.aclose()

    async def serve_until_signal(self, grace: float) -> None:
        await self.server.serve_until_signal(grace, on_stop=self.stop)
