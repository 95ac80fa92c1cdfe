"""The contract between the scheduler and the model runner (mirrored by worker.proto).

The scheduler produces a ``SchedulerOutput`` per step (new requests in full, running ones as
diffs); the runner answers with a ``ModelRunnerOutput``; the scheduler turns that into
``RequestUpdate``s for its clients. ``ModelLimits`` is what a runner serves, as every layer
above it checks requests against it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gridllm.common.sampling_params import SamplingParams


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class ErrorKind(str, enum.Enum):
    """Why a request ended with an error rather than a finish reason."""

    # The request itself is at fault (a bad argument found after admission).
    INVALID_ARGUMENT = "invalid_argument"
    # The service could not serve it (its worker was lost and it could not resume).
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class ModelLimits:
    """What one served model accepts, as the runner resolved it from the model."""

    # Longest prompt + completion, in tokens.
    max_model_len: int
    # Rows of the output layer: every token id is below it.
    vocab_size: int
    # Tokens per KV block (prefix hashes are computed per block).
    block_size: int
    # The model's EOS token id, if known.
    eos_token_id: int | None = None
    # Set when every attention layer sees only this many latest tokens (a sliding window
    # on all layers, as Mistral's): KV blocks wholly before the window are given back.
    kv_window: int | None = None
    # Set (two or more entries) when the layers form several KV groups by attention
    # pattern (Gemma 2's local and global layers): each group's window, 0 for full
    # attention, full-attention groups first. Each group has its own block table per
    # request; a windowed group's blocks before the window are given back.
    kv_group_windows: tuple[int, ...] = ()

    @property
    def group_windows(self) -> tuple[int | None, ...]:
        """Each KV group's window (None: full attention); one group for most models."""
        if not self.kv_group_windows:
            return (self.kv_window,)
        return tuple(w or None for w in self.kv_group_windows)


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
    # The block tables of the KV groups after the first (``block_ids`` is the first
    # group's); empty for a model with one group.
    group_block_ids: list[list[int]] = field(default_factory=list)


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    req_id: str
    # Blocks appended to the request's block table this step.
    new_block_ids: list[int]
    num_computed_tokens: int
    # Blocks appended to the tables of the KV groups after the first; empty for a model
    # with one group.
    new_group_block_ids: list[list[int]] = field(default_factory=list)


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
class TokenLogprobs:
    """Log-probabilities at one position: the chosen token first, then the top-n."""

    token_ids: list[int]
    logprobs: list[float]
    # Rank of each token in the full distribution (1 = most likely).
    ranks: list[int]


@dataclass
class ModelRunnerOutput:
    # Requests that reached the end of their known tokens and sampled one, in batch order.
    req_ids: list[str] = field(default_factory=list)
    # req_id -> sampled token ids (one per step for now).
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # req_id -> one TokenLogprobs per sampled token (only where SamplingParams.logprobs is set).
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # req_id -> one TokenLogprobs per prompt position computed this step, for positions
    # 1..; position p holds the logprob of prompt token p given tokens < p.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # req_id -> why the runner refused the request (bad arguments found on the worker); the
    # scheduler finishes it with that error, the other requests of the step are unaffected.
    failed: dict[str, str] = field(default_factory=dict)


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
    # Why the request ended with an error (it then also has finish_reason ABORT).
    error: str | None = None
    error_kind: ErrorKind = ErrorKind.INVALID_ARGUMENT

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
