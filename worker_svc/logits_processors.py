"""Extra logits processors, registered by name: the extension point for new sampling methods.

One rule decides where a processor runs: on the rows whose ``SamplingParams.logits_processors``
lists its name. Its arguments travel in ``SamplingParams.extra_args`` under keys the processor
documents, and its optional ``verify`` hook rejects bad arguments with a ``ValueError`` when the
request is admitted (``verify_logits_processors``).

A processor is batched: it gets the logits of exactly the rows that enabled it, ``[R, V]``
float32, plus a ``ProcessorBatch`` with those rows' params and token ids, and returns new
logits of the same shape (out of place). The sampler runs processors after allowed_token_ids,
min_tokens and logit_bias and before penalties and temperature, in registration order.
See docs/contributing.md for a walkthrough.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gridllm.common.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class ProcessorBatch:
    """The rows one processor runs on, in the order of its logits' rows."""

    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]
    # Tokens generated so far (not including the one being sampled).
    output_token_ids: list[list[int]]

    def extra_arg(self, key: str, default: Any = None) -> list[Any]:
        """``params.extra_args[key]`` of every row (``default`` where a row lacks it)."""
        return [(p.extra_args or {}).get(key, default) for p in self.params]


LogitsProcessorFn = Callable[[torch.Tensor, ProcessorBatch], torch.Tensor]
VerifyFn = Callable[[SamplingParams], None]


@dataclass(frozen=True)
class LogitsProcessorSpec:
    name: str
    fn: LogitsProcessorFn
    # Raises ValueError naming the offending extra_args key; None accepts anything.
    verify: VerifyFn | None = None


_REGISTRY: dict[str, LogitsProcessorSpec] = {}


def register_logits_processor(name: str, *, verify: VerifyFn | None = None
                              ) -> Callable[[LogitsProcessorFn], LogitsProcessorFn]:
    """Decorator that registers a batched logits processor under ``name``.

    Args:
        name: what ``SamplingParams.logits_processors`` lists to enable it.
        verify: optional check of one request's params, run at admission.

    Returns:
        The decorator; it returns the function unchanged.
    """
    def decorator(fn: LogitsProcessorFn) -> LogitsProcessorFn:
        if name in _REGISTRY:
            raise ValueError(f"logits processor {name!r} is already registered")
        _REGISTRY[name] = LogitsProcessorSpec(name, fn, verify)
        logger.debug("registered logits processor %s", name)
        return fn
    return decorator


def registered_logits_processors() -> list[str]:
    """Names of all registered processors, in the order the sampler runs them."""
    return list(_REGISTRY)


def get_logits_processor(name: str) -> LogitsProcessorSpec:
    """The processor registered as ``name``; ValueError naming the field if there is none."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"logits_processors must name registered processors "
                         f"{registered_logits_processors()}, got {name!r}.")
    return spec


def verify_logits_processors(params: SamplingParams) -> None:
    """Check that every processor ``params`` enables exists and accepts its arguments.

    Args:
        params: one request's sampling params.

    Raises:
        ValueError: an unknown name, or bad arguments (raised by the processor's verify hook).
    """
    for name in params.logits_processors or []:
        spec = get_logits_processor(name)
        if spec.verify is not None:
            spec.verify(params)


# ---------------------------------------------------------------------------------------------
# Built-in processors.


def _verify_no_repeat_ngram(params: SamplingParams) -> None:
    size = (params.extra_args or {}).get("no_repeat_ngram_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f'extra_args["no_repeat_ngram_size"] must be an integer of at least 1, '
                         f"got {size!r}.")


@register_logits_processor("no_repeat_ngram", verify=_verify_no_repeat_ngram)
def no_repeat_ngram(logits: torch.Tensor, batch: ProcessorBatch) -> torch.Tensor:
    """Ban every token that would repeat an n-gram of prompt + output (transformers'
    ``no_repeat_ngram_size``); n is ``extra_args["no_repeat_ngram_size"]``."""
    rows: list[int] = []
    tokens: list[int] = []
    sizes = batch.extra_arg("no_repeat_ngram_size")
    # Per-row Python: matching n-grams is a sequential scan of each row's own tokens.
    for row, (n, prompt, output) in enumerate(zip(sizes, batch.prompt_token_ids,
                                                  batch.output_token_ids, strict=True)):
        ids = prompt + output
        if len(ids) + 1 < n:
            continue
        tail = ids[len(ids) - n + 1:] if n > 1 else []
        for start in range(len(ids) - n + 1):
            if ids[start:start + n - 1] == tail:
                rows.append(row)
                tokens.append(ids[start + n - 1])
    if not rows:
        return logits
    banned = torch.zeros_like(logits, dtype=torch.bool)
    banned[torch.tensor(rows, device=logits.device),
           torch.tensor(tokens, device=logits.device)] = True
    return logits.masked_fill(banned, float("-inf"))


def _verify_epsilon_cutoff(params: SamplingParams) -> None:
    epsilon = (params.extra_args or {}).get("epsilon_cutoff")
    if not isinstance(epsilon, (int, float)) or not 0.0 < epsilon < 1.0:
        raise ValueError(f'extra_args["epsilon_cutoff"] must be in (0, 1), got {epsilon!r}.')


@register_logits_processor("epsilon_cutoff", verify=_verify_epsilon_cutoff)
def epsilon_cutoff(logits: torch.Tensor, batch: ProcessorBatch) -> torch.Tensor:
    """Truncation sampling (Hewitt et al., 2022): drop tokens whose probability is below
    ``extra_args["epsilon_cutoff"]``; the most likely token always stays."""
    epsilon = torch.tensor(batch.extra_arg("epsilon_cutoff"), dtype=logits.dtype,
                           device=logits.device)
    probs = logits.softmax(dim=-1)
    remove = probs < epsilon[:, None]
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))
