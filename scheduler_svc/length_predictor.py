"""Output-length predictors for length-aware admission (``block_reservation="predicted"``).

A predictor guesses how many tokens a request will generate before it stops; the scheduler
reserves KV blocks for that many at admission. Two are provided:

- ``PromptHeuristicPredictor``: a fixed allowance per request (the classic rule of thumb of
  prompt + 200 tokens; the scheduler sees token ids only, so there is no keyword rule);
- ``OnlinePredictor``: the mean output length of recently finished requests with the same
  prompt template (its first tokens) and ``max_tokens`` bucket, falling back to the bucket
  alone and then to another predictor while it has too few samples.

Predictions are clipped to ``max_tokens`` by the caller.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Protocol

from scheduler_svc.request import Request


class OutputLengthPredictor(Protocol):
    def predict(self, request: Request) -> int:
        """Predicted number of output tokens of ``request`` when it finishes."""

    def observe(self, request: Request) -> None:
        """Learn from a request that finished on its own (stop token, stop string, length)."""


class PromptHeuristicPredictor:
    """Every request is predicted to generate ``num_output_tokens`` tokens."""

    def __init__(self, num_output_tokens: int = 200):
        if num_output_tokens < 1:
            raise ValueError(f"num_output_tokens must be at least 1, got {num_output_tokens}.")
        self.num_output_tokens = num_output_tokens

    def predict(self, request: Request) -> int:
        return self.num_output_tokens

    def observe(self, request: Request) -> None:
        pass


def max_tokens_bucket(max_tokens: int | None) -> int:
    """Power-of-two bucket of a ``max_tokens`` limit (0: no limit)."""
    return 0 if max_tokens is None else max(max_tokens, 1).bit_length()


class OnlinePredictor:
    """Mean output length per (prompt template, ``max_tokens`` bucket), learnt online.

    Args:
        fallback: answers while neither the template nor the bucket has ``min_samples``.
        template_tokens: leading prompt tokens that name the template (system prompt, chat
            template, few-shot preamble).
        window: recent finished requests kept per key.
        min_samples: samples a key needs before its mean is used.
        max_templates: templates remembered (least recently seen forgotten first).
    """

    def __init__(self, fallback: OutputLengthPredictor | None = None, *,
                 template_tokens: int = 16, window: int = 64, min_samples: int = 4,
                 max_templates: int = 4096):
        for name, value in (("template_tokens", template_tokens), ("window", window),
                            ("min_samples", min_samples), ("max_templates", max_templates)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        self.fallback = fallback or PromptHeuristicPredictor()
        self.template_tokens = template_tokens
        self.window = window
        self.min_samples = min_samples
        self.max_templates = max_templates
        self._by_template: OrderedDict[tuple, deque[int]] = OrderedDict()
        self._by_bucket: dict[int, deque[int]] = {}

    def _keys(self, request: Request) -> tuple[tuple, int]:
        bucket = max_tokens_bucket(request.sampling_params.max_tokens)
        template = hash(tuple(request.prompt_token_ids[:self.template_tokens]))
        return (template, bucket), bucket

    def predict(self, request: Request) -> int:
        template_key, bucket = self._keys(request)
        for samples in (self._by_template.get(template_key), self._by_bucket.get(bucket)):
            if samples is not None and len(samples) >= self.min_samples:
                return max(1, math.ceil(sum(samples) / len(samples)))
        return self.fallback.predict(request)

    def observe(self, request: Request) -> None:
        template_key, bucket = self._keys(request)
        samples = self._by_template.pop(template_key, None) or deque(maxlen=self.window)
        self._by_template[template_key] = samples  # most recently seen last
        if len(self._by_template) > self.max_templates:
            self._by_template.popitem(last=False)
        samples.append(request.num_output_tokens)
        self._by_bucket.setdefault(bucket, deque(maxlen=self.window)).append(
            request.num_output_tokens)
        self.fallback.observe(request)
