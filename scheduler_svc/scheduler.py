"""Continuous batching by ``num_computed_tokens``.

Every request's ``num_computed_tokens`` catches up to its token count: a fresh prompt,
a chunk of a long prompt, a decode step, a prefix-cache hit and a recompute after
preemption are all the same rule, so there is no prefill/decode mode.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from gridllm.common.config import SchedulerConfig, require
from gridllm.common.contract import (
    CachedRequestData,
    ModelLimits,
    ModelRunnerOutput,
    NewRequestData,
    RequestUpdate,
    SchedulerOutput,
)
from scheduler_svc.block_manager import BlockManager, KVBlock
from scheduler_svc.block_reservation import make_block_reservation
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.request_queue import make_queue

logger = logging.getLogger(__name__)


class Scheduler:
    """Chooses each step's tokens under the token, sequence and KV-block budgets.

    Args:
        scheduler_config: budgets, policy and prefix caching.
        limits: what the model runner serves (``max_model_len``, ``block_size``).
        num_kv_blocks: blocks in the runner's KV pool.
    """

    def __init__(self, scheduler_config: SchedulerConfig, limits: ModelLimits,
                 num_kv_blocks: int):
        require(num_kv_blocks >= 1, "num_kv_blocks", "must be at least 1", num_kv_blocks)
        scheduler_config.check_model_len(limits.max_model_len)
        self.config = scheduler_config
        self.limits = limits
        self.max_model_len = limits.max_model_len
        self.block_size = limits.block_size
        self.block_manager = BlockManager(num_kv_blocks, limits.block_size,
                                          scheduler_config.enable_prefix_caching,
                                          group_windows=limits.group_windows)
        self.requests: dict[str, Request] = {}
        self.waiting = make_queue(scheduler_config.scheduling_policy)
        self.running: list[Request] = []
        # Finished, aborted or preempted since the last schedule(): the runner drops them.
        self._finished_req_ids: set[str] = set()
        self.num_preemptions = 0
        # Length-aware admission (None unless block_reservation="predicted").
        self.reservation = make_block_reservation(scheduler_config, limits)

    # ----------------------------------------------------------------- requests
    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError if it can never run."""
        if request.req_id in self.requests:
            raise ValueError(f"request_id {request.req_id!r} is already in use.")
        self.check_prompt(request.prompt_token_ids)
        if request.output_token_ids:
            self.check_prompt(request.all_token_ids)  # a resubmitted request resumes here
        self.requests[request.req_id] = request
        self.waiting.add(request)

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        """ValueError if a prompt is empty, too long or larger than the KV pool."""
        num_tokens = len(prompt_token_ids)
        if num_tokens == 0:
            raise ValueError("prompt must not be empty.")
        if num_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_tokens} tokens; max_model_len is {self.max_model_len}, "
                f"so prompts must be shorter than {self.max_model_len} tokens.")
        # In every KV group (a windowed one may need them all if it runs in one chunk).
        num_blocks = -(-(num_tokens + 1) // self.block_size) * self.block_manager.num_groups
        if num_blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt needs {num_blocks} KV blocks but the cache holds only "
                f"{self.block_manager.num_blocks}.")

    def abort_requests(self, req_ids: Iterable[str],
                       status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> list[str]:
        """Finish requests early (client abort, or a stop string found downstream).

        Returns:
            The ids that were still unfinished.
        """
        aborted = []
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            aborted.append(req_id)
        return aborted

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if self.reservation is not None:
            self.reservation.observe(request)
        self.block_manager.free(request)
        self._finished_req_ids.add(request.req_id)
        del self.requests[request.req_id]

    def take_unfinished(self) -> list[Request]:
        """Remove every unfinished request, oldest first, freeing its blocks (its worker is
        gone); each is ready to ``restart`` on another core."""
        requests = sorted(self.requests.values(), key=lambda r: r.arrival_time)
        for request in requests:
            self.block_manager.free(request)
        self.requests.clear()
        self.running.clear()
        self.waiting = make_queue(self.config.scheduling_policy)
        return requests

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_queued_tokens(self) -> int:
        """Tokens (prompt + output so far) of the waiting requests."""
        return sum(r.num_tokens for r in self.waiting)

    def free_capacity(self) -> int:
        """Free KV blocks minus what the queued requests will take."""
        demand = sum(-(-r.num_tokens // self.block_size) for r in self.waiting)
        demand *= self.block_manager.num_groups
        return self.block_manager.num_free_blocks - demand

    # ----------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts, allocating KV blocks."""
        out = SchedulerOutput()
        token_budget = self.config.max_num_batched_tokens
        has_preempted = False

        # Requests that will sample a token in this step (their chunk reaches the end).
        sampling: set[str] = set()
        running = self.running
        allocate = self.block_manager.allocate_group_slots
        i = 0
        while i < len(running) and token_budget > 0:
            request = running[i]
            # Tokens not sent yet; none if the tokens in flight already reach max_tokens or
            # max_model_len (this runs per request per step: kept to local arithmetic).
            in_flight = request.num_output_placeholders
            num_new = (len(request.prompt_token_ids) + len(request.output_token_ids)
                       + in_flight - request.num_computed_tokens)
            if num_new > token_budget:
                num_new = token_budget
            if num_new <= 0 or (in_flight and self._reaches_length(request, in_flight)):
                i += 1  # its last token is still in flight
                continue
            new_block_ids = allocate(request, num_new)
            while new_block_ids is None:
                # Out of blocks: preempt by recompute until the request fits (or is the victim).
                victim = self._pick_victim()
                victim_index = self.running.index(victim)
                self._preempt(victim)
                has_preempted = True
                if victim.req_id in out.num_scheduled_tokens:
                    token_budget += out.num_scheduled_tokens.pop(victim.req_id)
                    out.scheduled_cached_reqs = [
                        c for c in out.scheduled_cached_reqs if c.req_id != victim.req_id]
                    if victim.req_id in sampling:
                        sampling.discard(victim.req_id)
                        victim.num_output_placeholders -= 1
                if victim is request:
                    break
                if victim_index < i:
                    i -= 1
                new_block_ids = allocate(request, num_new)
            if new_block_ids is None:
                continue  # running[i] is now the next request
            out.scheduled_cached_reqs.append(CachedRequestData(
                request.req_id, new_block_ids[0], request.num_computed_tokens,
                new_block_ids[1:]))
            self._advance(request, num_new, sampling)
            out.num_scheduled_tokens[request.req_id] = num_new
            token_budget -= num_new
            i += 1

        while (not has_preempted and len(self.waiting) and token_budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting.peek()
            if request.num_output_placeholders:
                break  # preempted with a token in flight: rebuild it once the token is known
            computed_blocks: list[KVBlock] = []
            num_computed = request.num_computed_tokens
            if num_computed == 0:
                computed_blocks, num_computed = self.block_manager.get_computed_blocks(request)
            num_new = request.num_tokens - num_computed
            if not self.config.enable_chunked_prefill and num_new > token_budget:
                break
            num_new = min(num_new, token_budget)
            if self.reservation is not None and not self.reservation.admits(
                    request, computed_blocks, self.running, self.block_manager):
                break  # its predicted footprint would crowd out the running requests
            if self.block_manager.allocate_group_slots(request, num_new,
                                                       computed_blocks) is None:
                break
            self.waiting.pop()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_computed
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed
            self.running.append(request)
            out.scheduled_new_reqs.append(NewRequestData(
                request.req_id, list(request.prompt_token_ids), request.sampling_params,
                list(request.output_token_ids), self.block_manager.get_block_ids(request.req_id),
                num_computed, self.block_manager.get_group_block_ids(request.req_id)))
            self._advance(request, num_new, sampling)
            out.num_scheduled_tokens[request.req_id] = num_new
            token_budget -= num_new

        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        out.finished_req_ids = self._finished_req_ids
        self._finished_req_ids = set()
        return out

    @staticmethod
    def _advance(request: Request, num_new: int, sampling: set[str]) -> None:
        # Counted as computed once sent: the next step may be scheduled before this one's
        # answer (pipelining); a chunk reaching the end samples a token, known one step later.
        request.num_computed_tokens += num_new
        if (request.num_computed_tokens == len(request.prompt_token_ids)
                + len(request.output_token_ids) + request.num_output_placeholders):
            request.num_output_placeholders += 1
            sampling.add(request.req_id)

    def _reaches_length(self, request: Request, num_ahead: int = 0) -> bool:
        """True if ``num_ahead`` more tokens bring the request to max_tokens or max_model_len."""
        max_tokens = request.sampling_params.max_tokens
        num_output = len(request.output_token_ids) + num_ahead
        return ((max_tokens is not None and num_output >= max_tokens)
                or len(request.prompt_token_ids) + num_output >= self.max_model_len)

    def _pick_victim(self) -> Request:
        # Lowest priority (largest value) first under the priority policy, then latest arrival.
        if self.config.scheduling_policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return max(self.running, key=lambda r: r.arrival_time)

    def _preempt(self, request: Request) -> None:
        # Preemption by recompute: drop the KV; cached full blocks make the redo cheap.
        logger.debug("preempting %s (%d tokens)", request.req_id, request.num_tokens)
        self.running.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._finished_req_ids.add(request.req_id)
        self.waiting.prepend(request)

    # ----------------------------------------------------------------- update
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[RequestUpdate]:
        """Advance requests by what the step computed and sampled; apply stop checks."""
        updates = []
        requests = self.requests
        # Most steps carry no failures and no logprobs: one test each for the whole step.
        failed = runner_output.failed
        all_prompt_logprobs = runner_output.prompt_logprobs
        all_logprobs = runner_output.logprobs
        sampled = runner_output.sampled_token_ids
        for req_id in scheduler_output.num_scheduled_tokens:
            request = requests.get(req_id)
            if request is None:
                continue  # finished or aborted while the step ran
            update = RequestUpdate(req_id, num_cached_tokens=request.num_cached_tokens)
            error = failed.get(req_id) if failed else None
            if error is not None:
                # Refused by the runner: nothing it produced for the request is valid.
                request.num_output_placeholders = 0
                request.status = RequestStatus.FINISHED_ABORTED
                update.error = error
            if all_prompt_logprobs:
                prompt_logprobs = all_prompt_logprobs.get(req_id)
                if prompt_logprobs:
                    update.new_prompt_logprobs = prompt_logprobs
            logprobs = all_logprobs.get(req_id) if all_logprobs else None
            for k, token_id in enumerate(sampled.get(req_id, ())):
                if not request.num_output_placeholders or request.is_finished:
                    break  # not expected (its step was undone by a preemption)
                # Tokens land even if the request was preempted meanwhile: the sample is valid.
                request.num_output_placeholders -= 1
                request.output_token_ids.append(token_id)
                update.new_token_ids.append(token_id)
                if logprobs is not None:
                    update.new_logprobs = (update.new_logprobs or []) + [logprobs[k]]
                if self._check_stop(request):
                    break
            if request.is_finished:
                if request in self.running:
                    self.running.remove(request)
                else:
                    self.waiting.remove(request)
                self._finish(request, request.status)
                update.finish_reason = request.finish_reason
                update.stop_reason = request.stop_reason
            if update.new_token_ids or update.finished or update.new_prompt_logprobs:
                updates.append(update)
        return updates

    def _check_stop(self, request: Request) -> bool:
        params = request.sampling_params
        last = request.output_token_ids[-1]
        if len(request.output_token_ids) >= params.min_tokens:
            if not params.ignore_eos and last == request.eos_token_id:
                request.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in (params.stop_token_ids or []):
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = last
                return True
        if self._reaches_length(request):
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
