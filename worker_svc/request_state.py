"""What the runner remembers about one request between steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gridllm.common.contract import NewRequestData
from gridllm.common.sampling_params import SamplingParams

if TYPE_CHECKING:
    from worker_svc.structured_output import RequestGrammar


@dataclass
class RequestState:
    """What the runner remembers about a request between steps."""

    req_id: str
    num_prompt_tokens: int
    # Prompt followed by the generated tokens whose ids the host has read.
    token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    # Philox key of the request's draws (its seed, or one drawn at admission).
    seed: int
    # Prompt logprobs are reported once: a request rebuilt after preemption already sent them.
    needs_prompt_logprobs: bool
    # Sampled by steps whose output the host has not read yet (ids still on the device).
    num_pending_tokens: int = 0
    # The grammar matcher of a request with structured_outputs (fed each token read).
    grammar: RequestGrammar | None = None
    # The block tables of the KV groups after the first (``block_ids`` is the first's).
    group_block_ids: list[list[int]] = field(default_factory=list)

    @classmethod
    def from_new(cls, new: NewRequestData, seed: int) -> RequestState:
        params = new.sampling_params
        return cls(req_id=new.req_id, num_prompt_tokens=len(new.prompt_token_ids),
                   token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                   sampling_params=params, block_ids=list(new.block_ids),
                   num_computed_tokens=new.num_computed_tokens, seed=seed,
                   needs_prompt_logprobs=(params.prompt_logprobs is not None
                                          and not new.output_token_ids),
                   group_block_ids=[list(ids) for ids in new.group_block_ids])

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


def has_penalties(params: SamplingParams) -> bool:
    return (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
            or params.repetition_penalty != 1.0)


def needs_masking(params: SamplingParams) -> bool:
    """Stages the sampler builds per step from Python state (rare features)."""
    return (params.allowed_token_ids is not None or params.min_tokens > 0
            or bool(params.logit_bias) or bool(params.logits_processors))
