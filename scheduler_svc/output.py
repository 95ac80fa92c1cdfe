"""The contract between scheduler and model runner (mirrored by worker.proto)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gridllm.sampling_params import SamplingParams
from scheduler_svc.request import FinishReason
from worker_svc.output import TokenLogprobs


@dataclass
class NewRequestData:
    """A request the runner has not seen (or must rebuild after preemption): sent in full."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # Tokens generated before a preemption; empty for a fresh request.
    output_token_ids: list[int]
    block_ids: list[int]
    # Tokens whose KV is already in the cache (prefix-cache hit).
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    req_id: str
    # Blocks appended to the request's block table this step.
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    # req_id -> number of tokens to compute this step (in batch order: new, then cached).
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # Requests finished, aborted or preempted since the last step: the runner drops their state.
    finished_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class RequestUpdate:
    """What one step changed for one request (the scheduler's output to its clients)."""

    req_id: str
    new_token_ids: list[int] = field(default_factory=list)
    # One entry per new token when SamplingParams.logprobs is set.
    new_logprobs: list[TokenLogprobs] | None = None
    # Prompt positions computed this step when SamplingParams.prompt_logprobs is set.
    new_prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    # The stop token id that finished the request, if any.
    stop_reason: int | str | None = None
    # Prompt tokens served from the prefix cache.
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
