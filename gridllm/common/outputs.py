"""What ``LLM.generate`` returns (vLLM-compatible shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gridllm.common.contract import FinishReason  # noqa: F401  (re-exported)


@dataclass
class Logprob:
    """Log-probability of one token at one position."""

    logprob: float
    # 1 for the most likely token.
    rank: int
    decoded_token: str | None = None


# One position: token id -> its Logprob (the sampled/prompt token plus the top-n).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One completion of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    # "stop" | "length" | "abort", None while unfinished.
    finish_reason: str | None = None
    # One entry per generated token when SamplingParams.logprobs is set.
    logprobs: list[PositionLogprobs] | None = None
    # The stop string or stop token id that ended it, if any.
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The outputs of one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    # One entry per prompt token (None for the first) when prompt_logprobs is set.
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # Number of prompt tokens served from the prefix cache.
    num_cached_tokens: int = 0
