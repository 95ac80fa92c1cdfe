"""Sampling parameters with vLLM-compatible names, defaults and ranges."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gridllm.common.structured_outputs import StructuredOutputsParams

# Below this temperature sampling is greedy (vLLM's threshold).
_GREEDY_EPS = 1e-5
# logit_bias values are clamped to this magnitude, as the OpenAI API does.
_MAX_LOGIT_BIAS = 100.0
# Seeds are 64-bit signed integers (the API's int64).
_MIN_SEED, _MAX_SEED = -(2**63), 2**63 - 1


@dataclass
class SamplingParams:
    """How to sample the completion of one prompt.

    Names, defaults and allowed ranges follow vLLM's ``SamplingParams``; an
    out-of-range value raises ``ValueError`` naming the field and its range.
    """

    # Number of completions to return for the prompt.
    n: int = 1
    # Softmax temperature; 0 means greedy.
    temperature: float = 1.0
    # Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p.
    top_p: float = 1.0
    # Keep the top_k most likely tokens; 0 or -1 switches it off.
    top_k: int = 0
    # Drop tokens whose probability is below min_p times the most likely one's.
    min_p: float = 0.0
    # Subtracted once from the logit of every token already generated.
    presence_penalty: float = 0.0
    # Subtracted per occurrence from the logit of every generated token.
    frequency_penalty: float = 0.0
    # Divides positive / multiplies negative logits of tokens seen in prompt or output.
    repetition_penalty: float = 1.0
    # Seed of this request's own random generator (None: engine's generator).
    seed: int | None = None
    # Strings that end the completion (not part of the text unless include_stop_str_in_output).
    stop: str | list[str] | None = None
    # Token ids that end the completion (kept in token_ids).
    stop_token_ids: list[int] | None = None
    # Keep generating past the end-of-sequence token.
    ignore_eos: bool = False
    # Most tokens to generate; None means up to max_model_len.
    max_tokens: int | None = 16
    # Fewest tokens to generate before EOS or stop_token_ids may end the completion.
    min_tokens: int = 0
    # Number of top log-probabilities to return per generated token (plus the sampled one).
    logprobs: int | None = None
    # Number of top log-probabilities to return per prompt token.
    prompt_logprobs: int | None = None
    # Leave special tokens out of the detokenized text.
    skip_special_tokens: bool = True
    # Keep the matched stop string at the end of the text.
    include_stop_str_in_output: bool = False
    # Added to the logits of the given token ids before sampling, clamped to [-100, 100].
    logit_bias: dict[int, float] | None = None
    # Only these token ids may be sampled.
    allowed_token_ids: list[int] | None = None
    # Names of extra logits processors (see worker_svc.logits_processors) to run.
    logits_processors: list[str] | None = None
    # Free-form arguments read by extra logits processors.
    extra_args: dict[str, Any] | None = field(default=None)
    # Constrain the completion to a JSON schema, regex, choice or grammar (a dict is read as
    # StructuredOutputsParams' fields).
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            # NaN would slip through the clamp below as +100; reject it.
            _check(all(float(b) == float(b) for b in self.logit_bias.values()), "logit_bias",
                   "values must be numbers, not NaN", self.logit_bias)
            self.logit_bias = {
                int(tok): max(-_MAX_LOGIT_BIAS, min(_MAX_LOGIT_BIAS, float(bias)))
                for tok, bias in self.logit_bias.items()
            }
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = [int(t) for t in self.allowed_token_ids]
        self.logits_processors = list(self.logits_processors or [])
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        self._verify()
        if self.is_greedy:
            # Greedy sampling ignores the filters; normalise them so batches stay uniform.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def _verify(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", "must be at least 1", self.n)
        _check(self.temperature >= 0.0, "temperature", "must be non-negative", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and (self.top_k >= -1), "top_k",
               "must be 0 or -1 (disable), or at least 1", self.top_k)
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p)
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               "must be in [-2, 2]", self.presence_penalty)
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               "must be in [-2, 2]", self.frequency_penalty)
        _check(self.repetition_penalty > 0.0, "repetition_penalty",
               "must be greater than zero", self.repetition_penalty)
        _check(self.seed is None or isinstance(self.seed, int), "seed",
               "must be an integer or None", self.seed)
        # Completion k of n is seeded with seed + k, which must stay a 64-bit integer.
        _check(self.seed is None or _MIN_SEED <= self.seed <= _MAX_SEED - (self.n - 1),
               "seed", f"must be in [{_MIN_SEED}, {_MAX_SEED} - (n - 1)]", self.seed)
        _check(self.max_tokens is None
               or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", "must be at least 1", self.max_tokens)
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               "must be greater than or equal to 0", self.min_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens",
                   f"must be less than or equal to max_tokens={self.max_tokens}", self.min_tokens)
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
               "logprobs", "must be non-negative", self.logprobs)
        _check(self.prompt_logprobs is None
               or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
               "prompt_logprobs", "must be non-negative", self.prompt_logprobs)
        _check(all(isinstance(s, str) and s for s in self.stop or []), "stop",
               "must contain only non-empty strings", self.stop)
        _check(all(t >= 0 for t in self.stop_token_ids or []), "stop_token_ids",
               "must contain only non-negative token ids", self.stop_token_ids)
        _check(self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
               "allowed_token_ids", "must not be empty", self.allowed_token_ids)
        _check(self.allowed_token_ids is None or all(t >= 0 for t in self.allowed_token_ids),
               "allowed_token_ids", "must contain only non-negative token ids",
               self.allowed_token_ids)
        _check(self.logit_bias is None or all(t >= 0 for t in self.logit_bias),
               "logit_bias", "keys must be non-negative token ids", self.logit_bias)
        # A processor named twice would run twice per step: a cheap way to stall a worker.
        _check(len(set(self.logits_processors or [])) == len(self.logits_processors or []),
               "logits_processors", "must name each processor at most once",
               self.logits_processors)

    def verify_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a token id field names a token outside [0, vocab_size)."""
        for name in ("stop_token_ids", "allowed_token_ids"):
            ids = getattr(self, name) or []
            bad = [t for t in ids if t >= vocab_size]
            _check(not bad, name, f"must be token ids in [0, {vocab_size})", bad)
        bad = [t for t in (self.logit_bias or {}) if t >= vocab_size]
        _check(not bad, "logit_bias", f"keys must be token ids in [0, {vocab_size})", bad)
        # Longer lists repeat ids: they only cost memory and time.
        for name in ("allowed_token_ids", "stop_token_ids"):
            num_ids = len(getattr(self, name) or [])
            _check(num_ids <= vocab_size, name,
                   f"must have at most one entry per token of the vocabulary ({vocab_size})",
                   num_ids)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or value <= vocab_size, name,
                   f"must be at most the vocabulary size {vocab_size}", value)

    def verify_max_tokens(self, num_prompt_tokens: int, max_model_len: int) -> None:
        """ValueError naming max_tokens if prompt + max_tokens exceeds the context (as vLLM
        refuses it; the completion is not silently cut to fit)."""
        if self.max_tokens is None or num_prompt_tokens + self.max_tokens <= max_model_len:
            return
        room = max(max_model_len - num_prompt_tokens, 0)
        raise ValueError(
            f"max_tokens must be at most {room} for this prompt: the prompt has "
            f"{num_prompt_tokens} tokens and max_model_len is {max_model_len}, got "
            f"{self.max_tokens}.")

    def fit_max_tokens(self, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
        """These params with max_tokens cut to the room the prompt leaves (for a max_tokens
        the caller did not choose: a service's default); ValueError if even min_tokens
        does not fit."""
        room = max(max_model_len - num_prompt_tokens, 0)
        if self.max_tokens is None or self.max_tokens <= room:
            return self
        fitted = self.clone(max_tokens=max(room, self.min_tokens, 1))
        fitted.verify_max_tokens(num_prompt_tokens, max_model_len)
        return fitted

    def clone(self, **changes: Any) -> SamplingParams:
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        values.update(changes)
        return SamplingParams(**values)


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} {allowed}, got {value!r}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, (list, tuple)) and all(check(v) for v in value)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _is_token_key(value: Any) -> bool:
    # JSON objects (the OpenAI API's logit_bias) key token ids by their decimal string.
    return _is_int(value) or (isinstance(value, str) and value.strip().isdigit())


_TYPE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_is_int, "an integer"),
    "temperature": (_is_number, "a finite number"),
    "top_p": (_is_number, "a finite number"),
    "top_k": (_is_int, "an integer"),
    "min_p": (_is_number, "a finite number"),
    "presence_penalty": (_is_number, "a finite number"),
    "frequency_penalty": (_is_number, "a finite number"),
    "repetition_penalty": (_is_number, "a finite number"),
    "seed": (_optional(_is_int), "an integer or None"),
    "stop": (_optional(lambda v: isinstance(v, str) or _is_list_of(
        lambda s: isinstance(s, str))(v)), "a string, a list of strings or None"),
    "stop_token_ids": (_optional(_is_list_of(_is_int)), "a list of integer token ids"),
    "ignore_eos": (lambda v: isinstance(v, bool), "a bool"),
    "max_tokens": (_optional(_is_int), "an integer or None"),
    "min_tokens": (_is_int, "an integer"),
    "logprobs": (_optional(_is_int), "an integer or None"),
    "prompt_logprobs": (_optional(_is_int), "an integer or None"),
    "skip_special_tokens": (lambda v: isinstance(v, bool), "a bool"),
    "include_stop_str_in_output": (lambda v: isinstance(v, bool), "a bool"),
    "logit_bias": (_optional(lambda v: isinstance(v, dict) and all(
        _is_token_key(k) and isinstance(b, numbers.Real) and not isinstance(b, bool)
        for k, b in v.items())), "a dict of token id -> number"),
    "allowed_token_ids": (_optional(_is_list_of(_is_int)), "a list of integer token ids"),
    "logits_processors": (_optional(_is_list_of(lambda v: isinstance(v, str))),
                          "a list of processor names"),
    "extra_args": (_optional(lambda v: isinstance(v, dict) and all(
        isinstance(k, str) for k in v)), "a dict with string keys"),
    "structured_outputs": (_optional(lambda v: isinstance(v, (StructuredOutputsParams, dict))),
                           "a StructuredOutputsParams (or a dict of its fields) or None"),
}


class SamplingParamsTypeError(TypeError, ValueError):
    """A field of the wrong type. Also a ValueError: to a service it is a bad argument like
    an out-of-range value (INVALID_ARGUMENT / HTTP 400)."""


def _check_types(params: SamplingParams) -> None:
    """SamplingParamsTypeError naming the first field whose value has the wrong type."""
    for name, (check, allowed) in _TYPE_CHECKS.items():
        value = getattr(params, name)
        if not check(value):
            raise SamplingParamsTypeError(f"{name} must be {allowed}, got {value!r} "
                                          f"({type(value).__name__}).")
