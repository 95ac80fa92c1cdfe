"""The Scheduler gRPC service: Submit, Abort, GetStats and GetInfo over the worker links
that scheduler_svc.server.SchedulerServer maintains.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from gridllm.convert import request_update_to_pb, sampling_params_from_pb
from gridllm.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2
from scheduler_svc.output import RequestUpdate
from scheduler_svc.request import FinishReason, Request, RequestStatus, build_request
from scheduler_svc.worker_link import WorkerLink

if TYPE_CHECKING:
    from scheduler_svc.server import SchedulerServer

logger = logging.getLogger(__name__)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    """Request handling over the links that SchedulerServer maintains."""

    def __init__(self, server: SchedulerServer):
        self.server = server
        # req_id -> the queue its Submit stream reads updates from.
        self.streams: dict[str, asyncio.Queue[RequestUpdate]] = {}
        self.req_links: dict[str, WorkerLink] = {}

    def deliver(self, updates: list[RequestUpdate]) -> None:
        for update in updates:
            queue = self.streams.get(update.req_id)
            if queue is not None:
                queue.put_nowait(update)
            if update.finished:
                self.req_links.pop(update.req_id, None)

    # ----------------------------------------------------------------- Submit
    async def Submit(self, request: scheduler_pb2.SubmitRequest, context):
        """Queue a request on a worker and stream its tokens.

        Args:
            request: token ids, sampling parameters, priority.
        Returns:
            SubmitResponse messages; the last carries finish_reason. A cancelled call
            aborts the request. INVALID_ARGUMENT names a bad field; UNAVAILABLE without workers.
        """
        links = self.server.alive_links()
        if not links:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker is connected")
        req = self._make_request(request, links[0].info)
        link = self.server.pick_link(req, links)
        queue: asyncio.Queue[RequestUpdate] = asyncio.Queue()
        self.streams[req.req_id] = queue
        is_finished = False
        try:
            link.add_request(req)
            self.req_links[req.req_id] = link
            while True:
                update = await queue.get()
                while not update.finished and not queue.empty():
                    # The stream fell behind the step loop: one message for all its steps.
                    update = _merge(update, queue.get_nowait())
                is_finished = update.finished
                yield request_update_to_pb(update, link.worker_id)
                if is_finished:
                    return
        finally:
            self.streams.pop(req.req_id, None)
            if not is_finished:
                # Cancelled by the client (or the router went away): free its blocks.
                self.req_links.pop(req.req_id, None)
                if link.is_alive:
                    link.abort([req.req_id])
                logger.debug("request %s cancelled", req.req_id)

    def _make_request(self, msg: scheduler_pb2.SubmitRequest,
                      info: worker_pb2.WorkerInfo) -> Request:
        if not msg.request_id:
            raise ValueError("request_id must not be empty.")
        if msg.request_id in self.streams:
            raise ValueError(f"request_id {msg.request_id!r} is already in use.")
        params = sampling_params_from_pb(
            msg.sampling_params if msg.HasField("sampling_params") else None)
        if params.n != 1:
            raise ValueError(f"n must be 1 per Submit (the router fans out n > 1), got {params.n}.")
        if params.logits_processors:
            # Imported only when used: it pulls in torch, which the scheduler needs not.
            from worker_svc.logits_processors import verify_logits_processors

            # A bad name or argument found inside a step would break the whole stream.
            verify_logits_processors(params)
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

        Args:
            request: the ids and the reason.
        Returns:
            The ids that were still unfinished.
        """
        is_stop = request.reason == scheduler_pb2.ABORT_REASON_STOP
        status = RequestStatus.FINISHED_STOPPED if is_stop else RequestStatus.FINISHED_ABORTED
        reason = FinishReason.STOP if is_stop else FinishReason.ABORT
        aborted = []
        for req_id in request.request_ids:
            link = self.req_links.get(req_id)
            if link is None or not link.abort([req_id], status):
                continue
            aborted.append(req_id)
            self.deliver([RequestUpdate(req_id, finish_reason=reason)])
        return scheduler_pb2.AbortResponse(aborted_request_ids=aborted)

    # ----------------------------------------------------------------- stats / info
    async def GetStats(self, request, context):
        """Returns:
            Requests running/waiting, prefix-cache counters and KV blocks per worker.
        """
        return self.server.stats()

    async def GetInfo(self, request, context):
        """Returns:
            The served model's limits (UNAVAILABLE before any worker connected).
        """
        info = self.server.model_info()
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker is connected")
        return info


def _merge(first: RequestUpdate, second: RequestUpdate) -> RequestUpdate:
    """Two consecutive updates of one request as one."""
    def join(a, b):
        return None if a is None and b is None else (a or []) + (b or [])

    return RequestUpdate(
        first.req_id, first.new_token_ids + second.new_token_ids,
        join(first.new_logprobs, second.new_logprobs),
        join(first.new_prompt_logprobs, second.new_prompt_logprobs),
        second.finish_reason, second.stop_reason, second.num_cached_tokens)
