"""One completion's stream: ``RequestUpdate``s in, ``CompletionDelta``s out.

``LLM`` (which accumulates the deltas into ``RequestOutput``s) and the router (which turns each
delta into a ``GenerateResponse``) both run their updates through ``CompletionState``, so text
deltas, stop strings, finish reasons, logprob decoding and usage are worked out in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gridllm.common.contract import FinishReason, RequestUpdate, TokenLogprobs
from gridllm.common.detokenizer import IncrementalDetokenizer
from gridllm.common.outputs import Logprob, PositionLogprobs
from gridllm.common.sampling_params import SamplingParams


@dataclass
class Usage:
    """Token counts of a finished completion."""

    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens served from the prefix cache.
    cached_tokens: int = 0


@dataclass
class DecodedLogprobs(TokenLogprobs):
    """``TokenLogprobs`` with the text of each token (None without a tokenizer).

    Every entry is kept, the chosen token first even where it is also among the top-n.
    """

    tokens: list[str] | None = None

    def to_position(self) -> PositionLogprobs:
        """``{token_id: Logprob}``, the chosen token first (a repeated id keeps its first entry)."""
        tokens = self.tokens or [None] * len(self.token_ids)
        position: PositionLogprobs = {}
        for token_id, logprob, rank, text in zip(self.token_ids, self.logprobs, self.ranks,
                                                 tokens, strict=True):
            position.setdefault(token_id, Logprob(logprob, rank, text))
        return position


def decode_logprobs(entries: list[TokenLogprobs] | None,
                    tokenizer: Any | None) -> list[DecodedLogprobs]:
    """Each entry with its tokens decoded one by one (as an API returns them)."""
    out = []
    for entry in entries or []:
        tokens = None
        if tokenizer is not None:
            # The chosen token is often among the top-n too: decode each id once.
            texts = {t: tokenizer.decode([t]) for t in dict.fromkeys(entry.token_ids)}
            tokens = [texts[t] for t in entry.token_ids]
        out.append(DecodedLogprobs(list(entry.token_ids), list(entry.logprobs),
                                   list(entry.ranks), tokens))
    return out


@dataclass
class CompletionDelta:
    """What one update added to one completion."""

    # Which of the request's n completions.
    index: int
    # Text added; never splits a character, holds back a tail that could begin a stop string.
    text: str
    new_token_ids: list[int] = field(default_factory=list)
    # One entry per new token when SamplingParams.logprobs is set.
    new_logprobs: list[DecodedLogprobs] = field(default_factory=list)
    # Prompt positions computed by this update when SamplingParams.prompt_logprobs is set.
    new_prompt_logprobs: list[DecodedLogprobs] = field(default_factory=list)
    # Set on the last delta only; a stop string found here wins over the engine's reason.
    finish_reason: FinishReason | None = None
    # The stop string or stop token id that ended it, if any.
    stop_reason: str | int | None = None
    # A stop string ended it while the engine still runs it: the engine must be told to stop.
    needs_abort: bool = False
    # Set on the last delta only.
    usage: Usage | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class CompletionState:
    """One completion in flight: detokenizer, tokens so far, stop-string resolution.

    Args:
        tokenizer: a transformers tokenizer, or None (text stays empty, logprobs undecoded).
        prompt_token_ids: the prompt (context for the first output tokens, and usage).
        params: the completion's SamplingParams (n == 1).
        index: which of the request's completions it is.
    """

    def __init__(self, tokenizer: Any | None, prompt_token_ids: list[int],
                 params: SamplingParams, index: int = 0):
        self.tokenizer = tokenizer
        self.params = params
        self.index = index
        self.num_prompt_tokens = len(prompt_token_ids)
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
        # Generated so far (with the tokens after a stop string that arrived in its update).
        self.token_ids: list[int] = []
        # Prompt tokens served from the prefix cache, as the first update reported them.
        self.num_cached_tokens: int | None = None
        self.finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def process(self, update: RequestUpdate) -> CompletionDelta:
        """Apply one update of this completion; returns what it added."""
        if self.finished:
            raise RuntimeError(f"request {update.req_id} got an update after it finished.")
        if self.num_cached_tokens is None:
            self.num_cached_tokens = max(update.num_cached_tokens, 0)
        self.token_ids.extend(update.new_token_ids)
        stop_str = self.detokenizer.update(update.new_token_ids)
        delta = CompletionDelta(self.index, "", list(update.new_token_ids))
        if self.params.logprobs is not None and update.new_logprobs:
            delta.new_logprobs = decode_logprobs(update.new_logprobs, self.tokenizer)
        if update.new_prompt_logprobs:
            delta.new_prompt_logprobs = decode_logprobs(update.new_prompt_logprobs,
                                                        self.tokenizer)
        if stop_str is not None:
            delta.finish_reason, delta.stop_reason = FinishReason.STOP, stop_str
            delta.needs_abort = update.finish_reason is None
        elif update.finish_reason is not None:
            delta.finish_reason, delta.stop_reason = update.finish_reason, update.stop_reason
        delta.text = self.detokenizer.get_delta(delta.finished)
        if delta.finished:
            self.finish_reason = delta.finish_reason
            delta.usage = Usage(self.num_prompt_tokens, len(self.token_ids),
                                self.num_cached_tokens or 0)
        return delta
