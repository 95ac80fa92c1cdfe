"""``CompletionDelta``s -> OpenAI response objects and stream chunks (plain dicts).

The same deltas the gRPC front turns into ``GenerateResponse``s; one ``ChoiceState`` per
choice accumulates what a non-streamed answer returns at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gridllm.common.completion import CompletionDelta, DecodedLogprobs


def usage_dict(num_prompt_tokens: int, num_completion_tokens: int,
               num_cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens}}


def _chosen_text(entry: DecodedLogprobs) -> str:
    return (entry.tokens or [""])[0]


def completion_logprobs(entries: list[DecodedLogprobs], text_offset: int) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs`` object: tokens, their logprobs, the top ones, offsets."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in entries:
        text = _chosen_text(entry)
        tokens.append(text)
        token_logprobs.append(entry.logprobs[0])
        texts = entry.tokens or [""] * len(entry.token_ids)
        top.append({t: lp for t, lp in zip(texts[1:], entry.logprobs[1:], strict=True)})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(entries: list[DecodedLogprobs]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object: one content entry per token with its top ones."""
    content = []
    for entry in entries:
        texts = entry.tokens or [""] * len(entry.token_ids)
        content.append({
            "token": texts[0], "logprob": entry.logprobs[0], "bytes": list(texts[0].encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                             for t, lp in zip(texts[1:], entry.logprobs[1:], strict=True)]})
    return {"content": content}


@dataclass
class ChoiceState:
    """One choice of an answer: its text, logprobs and end, as the deltas arrive."""

    index: int
    text: str = ""
    logprobs: list[DecodedLogprobs] = field(default_factory=list)
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Streaming chat: the first chunk of a choice carries the assistant role.
    has_sent_role: bool = False
    # Text already streamed (for the completions' text_offset).
    num_streamed_chars: int = 0

    def add(self, delta: CompletionDelta) -> None:
        self.text += delta.text
        self.logprobs.extend(delta.new_logprobs)
        self.num_tokens += len(delta.new_token_ids)
        self.token_ids.extend(delta.new_token_ids)
        if delta.finished:
            self.finish_reason = delta.finish_reason.value  # type: ignore[union-attr]
            self.stop_reason = delta.stop_reason
            if delta.usage is not None:
                self.num_cached_tokens = delta.usage.cached_tokens

    def completion_choice(self, with_logprobs: bool, with_token_ids: bool = False
                          ) -> dict[str, Any]:
        choice = {"index": self.index, "text": self.text,
                  "logprobs": completion_logprobs(self.logprobs, 0) if with_logprobs else None,
                  "finish_reason": self.finish_reason, "stop_reason": self.stop_reason}
        if with_token_ids:
            choice["token_ids"] = self.token_ids
        return choice

    def chat_choice(self, with_logprobs: bool) -> dict[str, Any]:
        return {"index": self.index, "message": {"role": "assistant", "content": self.text},
                "logprobs": chat_logprobs(self.logprobs) if with_logprobs else None,
                "finish_reason": self.finish_reason, "stop_reason": self.stop_reason}


def completion_chunk_choice(state: ChoiceState, delta: CompletionDelta, text: str,
                            with_logprobs: bool, with_token_ids: bool = False
                            ) -> dict[str, Any]:
    """The streamed choice for one delta of a completion (``text`` may carry an echo;
    ``token_ids``, vLLM's extra, when asked for)."""
    logprobs = None
    if with_logprobs:
        logprobs = completion_logprobs(delta.new_logprobs, state.num_streamed_chars)
    state.num_streamed_chars += len(text)
    choice = {"index": state.index, "text": text, "logprobs": logprobs,
              "finish_reason": delta.finish_reason.value if delta.finished else None,  # type: ignore[union-attr]
              "stop_reason": delta.stop_reason if delta.finished else None}
    if with_token_ids:
        choice["token_ids"] = delta.new_token_ids
    return choice


def chat_chunk_choices(state: ChoiceState, delta: CompletionDelta,
                       with_logprobs: bool) -> list[dict[str, Any]]:
    """The streamed choices for one delta of a chat completion: the role first (once),
    then content, then the finish reason."""
    choices = []
    if not state.has_sent_role:
        state.has_sent_role = True
        choices.append({"index": state.index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None})
    if delta.text or delta.new_logprobs:
        choices.append({"index": state.index, "delta": {"content": delta.text},
                        "logprobs": chat_logprobs(delta.new_logprobs) if with_logprobs else None,
                        "finish_reason": None})
    if delta.finished:
        choices.append({"index": state.index, "delta": {}, "logprobs": None,
                        "finish_reason": delta.finish_reason.value,  # type: ignore[union-attr]
                        "stop_reason": delta.stop_reason})
    return choices
