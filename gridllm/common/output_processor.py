"""A request's ``n`` completions (``fan_out``) and the offline engine's ``RequestOutput``s.

``OutputProcessor`` accumulates the ``CompletionDelta``s of ``CompletionState`` (the per-completion
logic the router streams from too) into one ``RequestOutput`` per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gridllm.common.completion import CompletionState
from gridllm.common.contract import RequestUpdate
from gridllm.common.outputs import CompletionOutput, RequestOutput
from gridllm.common.sampling_params import SamplingParams


@dataclass(frozen=True)
class Child:
    """One of a request's n completions, run as a request of its own (n == 1)."""

    req_id: str
    index: int
    params: SamplingParams


def fan_out(parent_id: str, params: SamplingParams) -> list[Child]:
    """The completions of one request: ids ``{parent_id}-{k}`` (``parent_id`` itself when
    n == 1) and seeds ``seed + k``, so each reproduces on its own."""
    ids = [parent_id] if params.n == 1 else [f"{parent_id}-{k}" for k in range(params.n)]
    return [Child(req_id, k, params.clone(n=1, seed=None if params.seed is None
                                          else params.seed + k))
            for k, req_id in enumerate(ids)]


@dataclass
class _Completion:
    state: CompletionState
    output: CompletionOutput
    parent_id: str


class OutputProcessor:
    """Tracks every in-flight prompt (and its ``n`` completions) of the offline engine."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        self._outputs: dict[str, RequestOutput] = {}
        self._completions: dict[str, _Completion] = {}
        self._num_unfinished: dict[str, int] = {}

    def add(self, parent_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams) -> list[Child]:
        """Track a prompt; returns its completions, for the engine to run."""
        children = fan_out(parent_id, params)
        self._outputs[parent_id] = RequestOutput(
            parent_id, prompt, prompt_token_ids,
            [None] if params.prompt_logprobs is not None else None)
        self._num_unfinished[parent_id] = len(children)
        for child in children:
            state = CompletionState(self.tokenizer, prompt_token_ids, child.params, child.index)
            output = CompletionOutput(child.index, "", [], None,
                                      [] if child.params.logprobs is not None else None)
            self._completions[child.req_id] = _Completion(state, output, parent_id)
        return children

    def process(self, updates: list[RequestUpdate]) -> tuple[list[RequestOutput], list[str]]:
        """Apply updates.

        Returns:
            Prompts whose every completion finished, and child ids that hit a stop string
            (to be finished in the engine).
        """
        finished_outputs, stopped_ids = [], []
        for update in updates:
            completion = self._completions[update.req_id]
            output = self._outputs[completion.parent_id]
            delta = completion.state.process(update)
            if delta.new_prompt_logprobs and delta.index == 0:
                output.prompt_logprobs.extend(  # type: ignore[union-attr]
                    e.to_position() for e in delta.new_prompt_logprobs)
            output.num_cached_tokens = max(output.num_cached_tokens, update.num_cached_tokens)
            completion_output = completion.output
            completion_output.text += delta.text
            completion_output.token_ids.extend(delta.new_token_ids)
            if completion_output.logprobs is not None:
                completion_output.logprobs.extend(e.to_position() for e in delta.new_logprobs)
            if delta.needs_abort:
                stopped_ids.append(update.req_id)
            if not delta.finished:
                continue
            completion_output.finish_reason = delta.finish_reason.value  # type: ignore[union-attr]
            completion_output.stop_reason = delta.stop_reason
            del self._completions[update.req_id]
            output.outputs.append(completion_output)
            self._num_unfinished[completion.parent_id] -= 1
            if self._num_unfinished[completion.parent_id] == 0:
                output.outputs.sort(key=lambda c: c.index)
                output.finished = True
                del self._num_unfinished[completion.parent_id]
                finished_outputs.append(self._outputs.pop(completion.parent_id))
        return finished_outputs, stopped_ids
