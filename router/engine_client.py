"""The router's one request path, shared by the gRPC and the HTTP (OpenAI) fronts.

A validated request goes to a scheduler (picked by load and prefix overlap) as one submit
per completion, over the router's one Session stream to that scheduler (or a Submit call
each, with ``scheduler_stream="submit"`` or a scheduler without sessions); the token updates
run through ``gridllm.common.completion.CompletionState`` (text deltas, stop strings, finish,
usage) and come out as ``CompletionDelta``s, which each front turns into its own messages.
Cancelling the iteration (a gRPC cancel or deadline, an HTTP client that went away) aborts
the requests upstream, which frees their KV blocks. A scheduler that dies mid-stream (its
session breaking) gets the prompt + tokens so far resubmitted elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from gridllm.common import tracing
from gridllm.common.auth import TENANT_KEY, tenant_var
from gridllm.common.completion import CompletionDelta, CompletionState
from gridllm.common.contract import ModelLimits
from gridllm.common.convert import (
    model_limits_from_pb,
    request_limits_from_pb,
    request_update_from_pb,
    sampling_params_to_pb,
)
from gridllm.common.grpc_utils import REQUEST_ID_KEY, RETRY_AFTER_KEY
from gridllm.common.logger import request_id_var
from gridllm.common.output_processor import Child, fan_out
from gridllm.common.request_ids import new_scope, scoped
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import generate_pb2, scheduler_pb2
from router.metrics import RouterMetrics
from router.request_log import RequestRecord
from router.routing import NoSchedulerError, SchedulerLink, SchedulerPool
from router.validation import ValidatedRequest, validate_request

logger = logging.getLogger(__name__)

# Threads tokenizing requests (and rendering chat templates) off the event loop; the
# tokenizers library releases the GIL while it encodes.
_NUM_TOKENIZER_THREADS = 4
# The retry hint of a request refused because the router serves max_num_streams already.
_RETRY_AFTER_MS = 1000
_T = TypeVar("_T")

# Status codes of a Submit stream that mean "the scheduler went away", not "the request is bad".
_RESUBMIT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                   grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL)
# How requests travel to a scheduler: a shared Session stream, or a Submit call each.
SCHEDULER_STREAMS = ("session", "submit")
# The largest request the router reads, a gRPC message or an HTTP body (RouterOptions'
# max_request_bytes).
DEFAULT_MAX_REQUEST_BYTES = 16 << 20


class RequestFailure(Exception):
    """Ends a request with ``code``; each front maps it (gRPC status, HTTP status).

    Args:
        code: the gRPC status code.
        details: the message for the client.
        retry_after_ms: the scheduler's retry hint (RESOURCE_EXHAUSTED), if any.
    """

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_ms: int | None = None):
        super().__init__(details)
        self.code = code
        self.details = details
        self.retry_after_ms = retry_after_ms


class EngineClient:
    """Runs validated requests on the schedulers of ``pool``.

    Args:
        tokenizer: the model's transformers tokenizer (None: token-id prompts only).
        eos_token_ids: the first is sent as the request's EOS, the rest as extra stop ids.
        pool: the schedulers.
        scheduler_wait_s: seconds a request waits for a scheduler.
        max_resubmits: resubmissions of one completion after scheduler failures.
        metrics: the router's metrics (None: none kept).
        max_num_streams: requests served at once; past it RESOURCE_EXHAUSTED.
        scheduler_stream: ``session``: the requests at one scheduler share one Session
            stream (one message per step for all of them); ``submit``: a Submit call each.
    """

    def __init__(self, tokenizer: Any | None, eos_token_ids: list[int], pool: SchedulerPool,
                 scheduler_wait_s: float = 60.0, max_resubmits: int = 3,
                 metrics: RouterMetrics | None = None, max_num_streams: int = 4096,
                 scheduler_stream: str = "session"):
        if scheduler_stream not in SCHEDULER_STREAMS:
            raise ValueError(f"scheduler_stream must be one of {SCHEDULER_STREAMS}, got "
                             f"{scheduler_stream!r}.")
        self.scheduler_stream = scheduler_stream
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.pool = pool
        self.scheduler_wait_s = scheduler_wait_s
        self.max_resubmits = max_resubmits
        self.metrics = metrics
        self.max_num_streams = max_num_streams
        # Requests being served now, over both fronts.
        self.num_streams = 0
        self._executor = ThreadPoolExecutor(_NUM_TOKENIZER_THREADS,
                                            thread_name_prefix="tokenize")
        # Each tokenizing thread works on its own copy of the tokenizer.
        self._local = threading.local()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------- model
    async def model_limits(self, deadline: float | None = None) -> ModelLimits:
        """The served model's limits (waits for a scheduler with workers; RequestFailure
        UNAVAILABLE when none comes in time)."""
        return model_limits_from_pb(await self._info(deadline))

    async def _info(self, deadline: float | None) -> scheduler_pb2.SchedulerInfo:
        info = self.pool.any_info()
        if info is None:
            await self._pick([], deadline)
            info = self.pool.any_info()
        assert info is not None
        return info

    async def validate(self, request: generate_pb2.GenerateRequest,
                       deadline: float | None = None) -> ValidatedRequest:
        """Check and tokenize a request against the model's limits and the request limits
        its scheduler admits, on a tokenizing thread (a huge prompt or chat template must not
        freeze the streams this event loop serves)."""
        info = await self._info(deadline)
        limits, request_limits = (model_limits_from_pb(info),
                                  request_limits_from_pb(info.request_limits))
        return await self.off_loop(
            lambda tokenizer: validate_request(request, tokenizer, limits, request_limits))

    async def off_loop(self, work: Callable[[Any], _T]) -> _T:
        """``work(tokenizer)`` on a tokenizing thread, with that thread's tokenizer copy."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor,
                                          lambda: work(self._thread_tokenizer()))

    def _thread_tokenizer(self) -> Any | None:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None and self.tokenizer is not None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return tokenizer

    @contextlib.contextmanager
    def stream_slot(self) -> Iterator[None]:
        """Counts one request being served; RequestFailure RESOURCE_EXHAUSTED (with a retry
        hint) past ``max_num_streams`` instead of queueing inside gRPC or the HTTP server."""
        if self.num_streams >= self.max_num_streams:
            raise RequestFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the router serves {self.num_streams} streams (max_num_streams="
                f"{self.max_num_streams}); retry later.", _RETRY_AFTER_MS)
        self.num_streams += 1
        try:
            yield
        finally:
            self.num_streams -= 1

    # ----------------------------------------------------------------- generate
    async def generate(self, validated: ValidatedRequest, deadline: float | None = None,
                       protocol: str = "grpc") -> AsyncIterator[CompletionDelta]:
        """Stream the deltas of a request's ``n`` completions (interleaved, each with its
        ``index``); the last delta of each completion carries its finish reason and usage.

        Args:
            validated: the checked request.
            deadline: ``time.monotonic()`` by which it must end (None: none).
            protocol: named in the access log.
        Raises:
            RequestFailure: no scheduler could serve it (UNAVAILABLE), the scheduler refused
                it (RESOURCE_EXHAUSTED, with its retry hint), or the deadline passed.
            ValueError: the scheduler found it invalid (the message names the field).
        """
        # Upstream ids are scoped to this request: clients' ids may collide, these do not.
        scope = new_scope()
        children = [dataclasses.replace(child, req_id=scoped(child.req_id, scope))
                    for child in fan_out(validated.request_id, validated.sampling_params)]
        record = RequestRecord(validated.request_id, len(validated.prompt_token_ids),
                               len(children), protocol, self.metrics, tenant_var.get())
        token = request_id_var.set(validated.request_id)
        code = grpc.StatusCode.OK
        try:
            with tracing.span("router.generate", validated.request_id):
                stream = (self._complete(validated, children[0], deadline) if len(children) == 1
                          else self._complete_n(validated, children, deadline))
                async for delta in stream:
                    record.on_delta(delta)
                    yield delta
        except RequestFailure as failure:
            code = failure.code
            raise
        except ValueError:
            code = grpc.StatusCode.INVALID_ARGUMENT
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            record.finish(status_text(protocol, code), code.name)
            with contextlib.suppress(ValueError):  # finalised in another context
                request_id_var.reset(token)

    async def _complete_n(self, validated: ValidatedRequest, children: list[Child],
                          deadline: float | None) -> AsyncIterator[CompletionDelta]:
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def run(child: Child) -> None:
            try:
                async for delta in self._complete(validated, child, deadline):
                    await queue.put(delta)
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
                        deadline: float | None) -> AsyncIterator[CompletionDelta]:
        """One completion; survives scheduler deaths by resubmitting prompt + tokens so far."""
        prompt_ids = validated.prompt_token_ids
        state = CompletionState(self.tokenizer, prompt_ids, child.params, child.index)
        tenant = tenant_var.get()
        trace_context = tracing.grpc_metadata()
        metadata = ((REQUEST_ID_KEY, validated.request_id),
                    *(((TENANT_KEY, tenant),) if tenant else ()), *trace_context)
        for attempt in range(self.max_resubmits + 1):
            # A new request is refused at once without a scheduler; one whose scheduler
            # died is held for it to come back (or another to take over).
            link = await self._pick(prompt_ids + state.token_ids, deadline,
                                    self.scheduler_wait_s if attempt else 0.0)
            request = self._submit_request(validated, child.req_id, attempt, child.params,
                                           state.token_ids)
            call: Any
            if self.scheduler_stream == "session" and link.supports_session:
                call = link.open_session().submit(scheduler_pb2.SessionSubmit(
                    request=request, tenant=tenant or "",
                    client_request_id=validated.request_id, trace_context=dict(trace_context)),
                    deadline)
            else:
                call = link.stub.Submit(request, timeout=_remaining(deadline),
                                        metadata=metadata)
            polls_before = link.admit()
            # Finished upstream (the scheduler freed the request), not here by a stop string.
            is_upstream_done = False
            is_prefilled = False  # the routing policy counts its prompt as queued until then
            try:
                async for msg in call:
                    if not is_prefilled:
                        link.prefilled()
                        is_prefilled = True
                    update = request_update_from_pb(msg)
                    is_upstream_done = update.finished
                    delta = state.process(update)
                    if is_upstream_done and update.error is None:
                        self.pool.note_computed(link, prompt_ids + state.token_ids)
                    yield delta
                    if delta.finished:
                        return
            except grpc.aio.AioRpcError as exc:
                self._raise_unless_resubmittable(exc, link, attempt)
            finally:
                link.release(polls_before)
                if not is_prefilled:
                    link.prefilled()
                if not is_upstream_done:
                    # Client cancel, deadline, stop string, or failure: abort it upstream.
                    call.cancel()
            if self.metrics is not None:
                self.metrics.resubmissions.inc()
            logger.warning("request %s lost its scheduler %s after %d tokens; resubmitting",
                           child.req_id, link.address, len(state.token_ids))
        raise RequestFailure(grpc.StatusCode.UNAVAILABLE,
                             f"request {child.req_id} failed after {self.max_resubmits} "
                             "resubmissions: schedulers keep failing")

    def _raise_unless_resubmittable(self, exc: grpc.aio.AioRpcError, link: SchedulerLink,
                                    attempt: int) -> None:
        code = exc.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise ValueError(exc.details())
        if code not in _RESUBMIT_CODES:
            raise RequestFailure(code, exc.details() or code.name, _retry_after_ms(exc))
        self.pool.mark_down(link)
        if attempt >= self.max_resubmits:
            raise RequestFailure(code, f"scheduler failed: {exc.details()}")

    async def _pick(self, token_ids: list[int], deadline: float | None,
                    wait_s: float = 0.0) -> SchedulerLink:
        """A scheduler for the tokens; RequestFailure UNAVAILABLE if none with a live worker
        answers within ``wait_s`` (0: a new request is refused at once)."""
        remaining = _remaining(deadline)
        if remaining is not None:
            wait_s = min(wait_s, remaining)
        try:
            return await self.pool.pick(token_ids, wait_s)
        except NoSchedulerError as exc:
            raise RequestFailure(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry later") from None

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


def deadline_after(seconds: float | None) -> float | None:
    """The ``time.monotonic()`` deadline ``seconds`` from now (None: none)."""
    return None if seconds is None else time.monotonic() + seconds


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _retry_after_ms(exc: grpc.aio.AioRpcError) -> int | None:
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return int(value)
            except ValueError:
                return None
    return None


# How each gRPC status code reads to an HTTP client (OpenAI's error statuses).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    # nginx's "client closed request": the client went away before the answer.
    grpc.StatusCode.CANCELLED: 499,
}


def status_text(protocol: str, code: grpc.StatusCode) -> str:
    """The status a front answered with: an HTTP status for ``http``, else the code name."""
    if protocol == "http":
        return str(HTTP_STATUS.get(code, 500))
    return code.name
