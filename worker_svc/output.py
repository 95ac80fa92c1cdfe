"""What the model runner returns for one step."""

from __future__ import annotations

from dataclasses import dataclass, field


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
