"""Turns the scheduler's RequestUpdates into ``RequestOutput``s (text, logprobs, stops)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gridllm.common.contract import RequestUpdate, TokenLogprobs
from gridllm.common.detokenizer import IncrementalDetokenizer
from gridllm.common.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from gridllm.common.sampling_params import SamplingParams


def to_position_logprobs(entry: TokenLogprobs, tokenizer: Any | None) -> PositionLogprobs:
    """``TokenLogprobs`` -> ``{token_id: Logprob}`` with decoded tokens, chosen token first."""
    position: PositionLogprobs = {}
    for token_id, logprob, rank in zip(entry.token_ids, entry.logprobs,
                                       entry.ranks, strict=True):
        if token_id not in position:
            text = tokenizer.decode([token_id]) if tokenizer is not None else None
            position[token_id] = Logprob(logprob, rank, text)
    return position


@dataclass
class _Completion:
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class OutputProcessor:
    """Tracks every in-flight prompt (and its ``n`` completions) of the offline engine."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        self._outputs: dict[str, RequestOutput] = {}
        # child req_id -> (parent id, completion state)
        self._children: dict[str, tuple[str, _Completion]] = {}
        self._num_completions: dict[str, int] = {}

    def add(self, parent_id: str, prompt: str | None, prompt_token_ids: list[int],
            child_params: dict[str, SamplingParams]) -> None:
        want_prompt_logprobs = any(p.prompt_logprobs is not None for p in child_params.values())
        self._outputs[parent_id] = RequestOutput(
            parent_id, prompt, prompt_token_ids, [None] if want_prompt_logprobs else None)
        self._num_completions[parent_id] = len(child_params)
        for index, (child_id, params) in enumerate(child_params.items()):
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
            completion = _Completion(index, params, detok,
                                     logprobs=[] if params.logprobs is not None else None)
            self._children[child_id] = (parent_id, completion)

    def process(self, updates: list[RequestUpdate]) -> tuple[list[RequestOutput], list[str]]:
        """Apply updates.

        Returns:
            Prompts whose every completion finished, and child ids that hit a stop string
            (to be finished in the engine).
        """
        finished_outputs, stopped_ids = [], []
        for update in updates:
            parent_id, completion = self._children[update.req_id]
            output = self._outputs[parent_id]
            if update.new_prompt_logprobs and completion.index == 0:
                output.prompt_logprobs.extend(  # type: ignore[union-attr]
                    to_position_logprobs(e, self.tokenizer) for e in update.new_prompt_logprobs)
            output.num_cached_tokens = max(output.num_cached_tokens, update.num_cached_tokens)
            completion.token_ids.extend(update.new_token_ids)
            if completion.logprobs is not None and update.new_logprobs:
                completion.logprobs.extend(to_position_logprobs(e, self.tokenizer)
                                           for e in update.new_logprobs)
            stop = completion.detokenizer.update(update.new_token_ids)
            if stop is not None and update.finish_reason is None:
                completion.finish_reason, completion.stop_reason = "stop", stop
                stopped_ids.append(update.req_id)
            elif update.finish_reason is not None:
                completion.finish_reason = update.finish_reason.value
                completion.stop_reason = update.stop_reason
            if completion.finish_reason is not None:
                completion.detokenizer.flush()
                del self._children[update.req_id]
                output.outputs.append(self._completion_output(completion))
                if len(output.outputs) == self._num_completions[parent_id]:
                    output.outputs.sort(key=lambda c: c.index)
                    output.finished = True
                    del self._num_completions[parent_id]
                    finished_outputs.append(self._outputs.pop(parent_id))
        return finished_outputs, stopped_ids

    def abort_all(self) -> list[RequestOutput]:
        """Close every in-flight prompt as aborted (e.g. generate() interrupted)."""
        for child_id in list(self._children):
            parent_id, completion = self._children.pop(child_id)
            completion.finish_reason = "abort"
            self._outputs[parent_id].outputs.append(self._completion_output(completion))
        outputs = list(self._outputs.values())
        self._outputs.clear()
        self._num_completions.clear()
        return outputs

    @staticmethod
    def _completion_output(c: _Completion) -> CompletionOutput:
        return CompletionOutput(c.index, c.detokenizer.output_text, list(c.token_ids),
                                c.finish_reason, c.logprobs, c.stop_reason)
