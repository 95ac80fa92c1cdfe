"""The Scheduler gRPC service: Submit, Session, Abort, GetStats and GetInfo over a WorkerPool."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from gridllm.common import tracing
from gridllm.common.auth import TENANT_KEY
from gridllm.common.contract import FinishReason, RequestUpdate
from gridllm.common.convert import (
    check_max_tokens,
    request_limits_to_pb,
    request_update_to_pb,
    sampling_params_from_pb,
)
from gridllm.common.grpc_utils import REQUEST_ID_KEY, RETRY_AFTER_KEY
from gridllm.common.logger import request_id_var
from gridllm.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2
from scheduler_svc.request import Request, RequestStatus, build_request
from scheduler_svc.session import ClientSession, update_error_code
from scheduler_svc.update_streams import UpdateStreams, merge_updates
from scheduler_svc.worker_pool import NoWorkerError, WorkerPool

logger = logging.getLogger(__name__)

_RETRY_AFTER_MS = 1000


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    """Request handling over the workers of a WorkerPool.

    Args:
        pool: the workers.
        streams: where the pool delivers the updates the Submit streams read.
        scheduler_id: reported by GetInfo.
        max_num_queued_reqs, max_num_queued_tokens: admission limits on the waiting queue
            (over all workers); past them Submit gets RESOURCE_EXHAUSTED.
        is_draining: whether the server is stopping (a Session then refuses new submits
            with UNAVAILABLE, as the server refuses new Submit calls).
    """

    retry_after_ms = _RETRY_AFTER_MS

    def __init__(self, pool: WorkerPool, streams: UpdateStreams, scheduler_id: str,
                 max_num_queued_reqs: int = 1024, max_num_queued_tokens: int = 1 << 20,
                 is_draining: Callable[[], bool] = lambda: False):
        self.pool = pool
        self.is_draining = is_draining
        # The Session streams open now.
        self.sessions: set[ClientSession] = set()
        # Messages written down the response streams, per RPC (a Prometheus counter).
        self.num_messages = {"Submit": 0, "Session": 0}
        # Request updates those messages carried, per RPC.
        self.num_updates = {"Submit": 0, "Session": 0}
        self.streams = streams
        self.scheduler_id = scheduler_id
        self.max_num_queued_reqs = max_num_queued_reqs
        self.max_num_queued_tokens = max_num_queued_tokens
        # Checked on every Submit (the router checks them first, but is not the only client).
        self.request_limits = pool.scheduler_config.request_limits()

    # ----------------------------------------------------------------- Submit
    async def Submit(self, request: scheduler_pb2.SubmitRequest, context):
        """Queue a request on a worker and stream its tokens.

        Args:
            request: token ids, sampling parameters, priority.
        Returns:
            SubmitResponse messages; the last carries finish_reason. A cancelled call
            aborts the request. INVALID_ARGUMENT names a bad field; UNAVAILABLE without workers.
        """
        metadata = context.invocation_metadata() or ()
        # The id the client knows (the router's); the request's own id otherwise.
        request_id_var.set(next((v for k, v in metadata if k == REQUEST_ID_KEY), None)
                           or request.request_id or None)
        with tracing.span("scheduler.submit", request.request_id, metadata):
            async for response in self._submit(request, context, _tenant(metadata)):
                yield response

    async def _submit(self, request: scheduler_pb2.SubmitRequest, context, tenant: str):
        try:
            req = self.make_request(request)
        except NoWorkerError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        refusal = self.admission_refusal(req)
        if refusal is not None:
            logger.info("request %s refused: %s", req.req_id, refusal)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal,
                                trailing_metadata=((RETRY_AFTER_KEY, str(_RETRY_AFTER_MS)),))
        queue = self.streams.open(req.req_id, tenant)
        is_finished = False
        num_output_tokens = 0
        worker_id = ""
        try:
            try:
                self.pool.add_request(req)
            except NoWorkerError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            while True:
                update, worker_id = await queue.get()
                while not update.finished and not queue.empty():
                    # The stream fell behind the step loop: one message for all its steps.
                    later, worker_id = queue.get_nowait()
                    update = merge_updates(update, later)
                is_finished = update.finished
                num_output_tokens += len(update.new_token_ids)
                if update.error is not None:
                    await context.abort(update_error_code(update), update.error)
                self.num_messages["Submit"] += 1
                self.num_updates["Submit"] += 1
                yield request_update_to_pb(update, worker_id)
                if is_finished:
                    return
        finally:
            self.streams.close(req.req_id)
            if not is_finished:
                # Cancelled by the client (or the router went away): free its blocks.
                self.pool.abort([req.req_id])
            logger.info("request %s of tenant %s %s on worker %s: %d prompt + %d output "
                        "tokens", req.req_id, tenant or "-",
                        update.finish_reason.value if is_finished and update.finish_reason
                        else "cancelled", worker_id or "-", req.num_prompt_tokens,
                        num_output_tokens)

    # ----------------------------------------------------------------- Session
    async def Session(self, request_iterator, context):
        """Many requests over one stream (the router's path).

        Args:
            request_iterator: SessionRequests: submits (a SubmitRequest with its tenant,
                client request id and trace context) and aborts.
        Returns:
            SessionResponses, each with every update of the session's requests since the
            previous one, and the errors that ended requests (a bad submit gets
            INVALID_ARGUMENT naming the field, a full queue RESOURCE_EXHAUSTED with
            retry_after_ms, no worker UNAVAILABLE); the session stays up. When the stream
            ends or breaks, its unfinished requests are aborted and their blocks freed.
        """
        session = ClientSession(self)
        self.sessions.add(session)
        try:
            async for message in session.serve(request_iterator):
                self.num_messages["Session"] += 1
                self.num_updates["Session"] += len(message.updates) + len(message.errors)
                yield message
        finally:
            self.sessions.discard(session)

    def wake_sessions(self) -> None:
        """Have every session look at its state (the server began draining)."""
        for session in self.sessions:
            session.outbox.wakeup.set()

    def admission_refusal(self, req: Request) -> str | None:
        """Why the waiting queue cannot take ``req`` now, or None."""
        num_waiting, num_tokens = self.pool.queued()
        if num_waiting >= self.max_num_queued_reqs:
            return (f"the scheduler's queue is full: {num_waiting} requests waiting "
                    f"(max_num_queued_reqs={self.max_num_queued_reqs}); retry later.")
        # An empty queue takes any request: the limit bounds waiting work, not request size.
        if num_waiting and num_tokens + req.num_tokens > self.max_num_queued_tokens:
            return (f"the scheduler's queue is full: {num_tokens} tokens waiting, this request "
                    f"adds {req.num_tokens} (max_num_queued_tokens="
                    f"{self.max_num_queued_tokens}); retry later.")
        return None

    def make_request(self, msg: scheduler_pb2.SubmitRequest) -> Request:
        """The request a SubmitRequest asks for (ValueError naming a bad field,
        NoWorkerError without a worker)."""
        info: worker_pb2.WorkerInfo = self.pool.any_info()
        if not msg.request_id:
            raise ValueError("request_id must not be empty.")
        if msg.request_id in self.streams:
            raise ValueError(f"request_id {msg.request_id!r} is already in use.")
        # Lengths first: a hostile list is refused before it is copied or scanned.
        num_tokens = len(msg.prompt_token_ids) + len(msg.output_token_ids)
        if num_tokens >= info.max_model_len:
            raise ValueError(f"prompt_token_ids has {len(msg.prompt_token_ids)} tokens and "
                             f"output_token_ids {len(msg.output_token_ids)}; max_model_len is "
                             f"{info.max_model_len}, so together they must be shorter.")
        sampling_msg = msg.sampling_params if msg.HasField("sampling_params") else None
        params = sampling_params_from_pb(sampling_msg, self.request_limits)
        params = check_max_tokens(params, sampling_msg, len(msg.prompt_token_ids),
                                  info.max_model_len)
        if params.n != 1:
            raise ValueError(f"n must be 1 per Submit (the router fans out n > 1), got {params.n}.")
        unknown = [n for n in params.logits_processors or [] if n not in info.logits_processors]
        if unknown:
            # Arguments are checked by the worker, which holds the processors.
            raise ValueError(f"logits_processors must name registered processors "
                             f"{list(info.logits_processors)}, got {unknown[0]!r}.")
        eos = msg.eos_token_id if msg.HasField("eos_token_id") else (
            info.eos_token_id if info.HasField("eos_token_id") else None)
        return build_request(msg.request_id, list(msg.prompt_token_ids), params,
                             info.vocab_size, eos_token_id=eos, priority=msg.priority,
                             extra_stop_token_ids=tuple(msg.extra_stop_token_ids),
                             output_token_ids=tuple(msg.output_token_ids),
                             cache_salt=msg.cache_salt or None)

    # ----------------------------------------------------------------- Abort
    async def Abort(self, request: scheduler_pb2.AbortRequest, context):
        """Finish requests early; their streams end with ABORT (or STOP for reason STOP).

        Only requests submitted by the caller's tenant (``x-gridllm-tenant`` metadata, none:
        the requests submitted without one) are touched; others' ids are ignored like
        unknown ones.

        Args:
            request: the ids and the reason.
        Returns:
            The ids that were still unfinished.
        """
        is_stop = request.reason == scheduler_pb2.ABORT_REASON_STOP
        status = RequestStatus.FINISHED_STOPPED if is_stop else RequestStatus.FINISHED_ABORTED
        reason = FinishReason.STOP if is_stop else FinishReason.ABORT
        tenant = _tenant(context.invocation_metadata() or ())
        aborted = self.pool.abort(self.streams.owned_by(list(request.request_ids), tenant),
                                  status)
        self.streams.deliver([RequestUpdate(req_id, finish_reason=reason) for req_id in aborted])
        return scheduler_pb2.AbortResponse(aborted_request_ids=aborted)

    # ----------------------------------------------------------------- stats / info
    async def GetStats(self, request, context):
        """Returns:
            Requests running/waiting, prefix-cache counters and KV blocks per worker.
        """
        return self.pool.stats()

    async def GetInfo(self, request, context):
        """Returns:
            The served model's limits (UNAVAILABLE before any worker connected).
        """
        info = self.pool.model_info(self.scheduler_id)
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker is connected")
        info.request_limits.CopyFrom(request_limits_to_pb(self.request_limits))
        info.supports_session = True
        return info


def _tenant(metadata) -> str:
    return next((v for k, v in metadata if k == TENANT_KEY), "")


# The former name (tests and callers that coalesce updates the same way).
_merge = merge_updates
