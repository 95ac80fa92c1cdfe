"""``CompletionDelta``s -> OpenAI response objects and stream chunks (plain dicts).

The same deltas the gRPC front turns into ``GenerateResponse``s; one ``ChoiceState`` per
choice accumulates what a non-streamed answer returns at the end.

A chat with tools reads the reply's tool calls (``gridllm.common.chat_tools``): a streamed
reply sends its text as content until a tool call may begin, and its calls whole, in one
chunk, once the reply is complete.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from gridllm.common.chat_tools import TOOL_CALL_START, parse_tool_calls
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
    # Text already streamed (the completions' text_offset; a chat's content sent).
    num_streamed_chars: int = 0
    # How tool calls are read from the reply (ParsedRequest.tool_mode) and the function a
    # named tool_choice forces.
    tool_mode: str | None = None
    tool_name: str | None = None

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
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        finish_reason = self.finish_reason
        content, calls = self.tool_calls(self.text)
        if calls:
            message = {"role": "assistant", "content": content,
                       "tool_calls": tool_call_dicts(calls)}
            finish_reason = self.calls_finish_reason(finish_reason)
        return {"index": self.index, "message": message,
                "logprobs": chat_logprobs(self.logprobs) if with_logprobs else None,
                "finish_reason": finish_reason, "stop_reason": self.stop_reason}

    def tool_calls(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        """``(content, [(name, arguments)])`` of a reply (no calls without tools)."""
        if self.tool_mode is None:
            return text, []
        if self.tool_mode == "named":
            return None, [(self.tool_name or "", text)]  # the arguments themselves
        return parse_tool_calls(text)

    def calls_finish_reason(self, finish_reason: str | None) -> str | None:
        # OpenAI's reason for a reply that called tools (a named choice just stops).
        return "tool_calls" if finish_reason == "stop" and self.tool_mode != "named" \
            else finish_reason

    def streamable(self, text: str) -> str:
        """The part of a chat reply so far that is content whatever follows (with tools, a
        tool call may still begin after it)."""
        if self.tool_mode is None:
            return text
        if self.tool_mode != "auto" or not text.strip() or text.lstrip()[0] in "{[":
            return ""  # a forced call, or one that may be bare JSON: whole at the end
        if TOOL_CALL_START in text:
            return text[:text.index(TOOL_CALL_START)]
        for k in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1):
            if text.endswith(TOOL_CALL_START[:k]):
                return text[:-k]
        return text


def tool_call_dicts(calls: list[tuple[str, str]], with_index: bool = False
                    ) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` entries (a streamed chunk's carry their ``index``)."""
    return [{**({"index": i} if with_index else {}), "id": f"call_{uuid.uuid4().hex[:24]}",
             "type": "function", "function": {"name": name, "arguments": arguments}}
            for i, (name, arguments) in enumerate(calls)]


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
    if state.tool_mode is not None:
        return choices + _tool_chunk_choices(state, delta)
    if delta.text or delta.new_logprobs:
        choices.append({"index": state.index, "delta": {"content": delta.text},
                        "logprobs": chat_logprobs(delta.new_logprobs) if with_logprobs else None,
                        "finish_reason": None})
    if delta.finished:
        choices.append({"index": state.index, "delta": {}, "logprobs": None,
                        "finish_reason": delta.finish_reason.value,  # type: ignore[union-attr]
                        "stop_reason": delta.stop_reason})
    return choices


def _tool_chunk_choices(state: ChoiceState, delta: CompletionDelta) -> list[dict[str, Any]]:
    """Content while it cannot be a tool call; at the end the rest, or the calls."""
    text = state.text + delta.text
    sent = text[:state.num_streamed_chars]
    choices = []
    calls: list[tuple[str, str]] = []
    if delta.finished:
        content, calls = state.tool_calls(text)
        rest = text[len(sent):] if not calls else (
            content[len(sent):] if content and content.startswith(sent) else "")
    else:
        rest = state.streamable(text)[len(sent):]
    if rest:
        state.num_streamed_chars += len(rest)
        choices.append({"index": state.index, "delta": {"content": rest}, "logprobs": None,
                        "finish_reason": None})
    if calls:
        choices.append({"index": state.index,
                        "delta": {"tool_calls": tool_call_dicts(calls, with_index=True)},
                        "logprobs": None, "finish_reason": None})
    if delta.finished:
        reason = delta.finish_reason.value  # type: ignore[union-attr]
        choices.append({"index": state.index, "delta": {}, "logprobs": None,
                        "finish_reason": state.calls_finish_reason(reason) if calls else reason,
                        "stop_reason": delta.stop_reason})
    return choices
