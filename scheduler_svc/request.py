"""A request as the scheduler tracks it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from gridllm.common.contract import FinishReason
from gridllm.common.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered so that ``status >= FINISHED_STOPPED`` means finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


_FIRST_FINISHED = int(RequestStatus.FINISHED_STOPPED)
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass
class Request:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # None when the tokenizer has no EOS (or is not loaded).
    eos_token_id: int | None = None
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # Extra key mixed into the prefix-cache hashes (e.g. a cache salt).
    cache_salt: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache or being computed by a step already sent; catches up
    # to num_tokens (+ placeholders), one rule for all phases.
    num_computed_tokens: int = 0
    # Tokens the worker sampled in steps still in flight (pipelined step loop): the worker
    # feeds them to the next step itself; the scheduler learns their ids one step later.
    num_output_placeholders: int = 0
    # Prompt tokens found in the prefix cache when first scheduled.
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    # Times the request moved to another worker after its worker was lost.
    num_migrations: int = 0
    # The stop token id that ended the request, if any.
    stop_reason: int | str | None = None

    def restart(self) -> None:
        """Start over on another worker from the tokens known so far (samples of steps still
        in flight on the lost worker are dropped: they were never reported)."""
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_output_placeholders = 0
        self.num_migrations += 1

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status >= _FIRST_FINISHED  # RequestStatus.is_finished without the lookups

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self.status)


def build_request(req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  vocab_size: int, *, eos_token_id: int | None = None, priority: int = 0,
                  extra_stop_token_ids: list[int] | tuple[int, ...] = (),
                  output_token_ids: list[int] | tuple[int, ...] = (),
                  cache_salt: str | None = None) -> Request:
    """A validated Request (ValueError naming the field otherwise).

    Args:
        extra_stop_token_ids: added to the params' stop_token_ids unless ignore_eos (e.g. a
            chat template's end-of-turn ids).
        output_token_ids: tokens generated before (a request resubmitted after its
            scheduler died): they count as output, for max_tokens and the penalties.
    """
    for name, ids in (("prompt_token_ids", prompt_token_ids),
                      ("output_token_ids", output_token_ids)):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name} must be in [0, {vocab_size}); got {bad[:5]}.")
    params.verify_vocab(vocab_size)
    stop_ids = list(params.stop_token_ids or [])
    extra = [t for t in extra_stop_token_ids if t not in stop_ids]
    if extra and not params.ignore_eos:
        params = params.clone(stop_token_ids=stop_ids + extra)
    return Request(req_id, list(prompt_token_ids), params, eos_token_id=eos_token_id,
                   priority=priority, cache_salt=cache_salt,
                   output_token_ids=list(output_token_ids))
