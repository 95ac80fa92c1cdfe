"""GenerateRequest -> a validated prompt and SamplingParams; errors name the bad field.

Every check the scheduler would make is made here first, so a bad request is refused with
INVALID_ARGUMENT before it reaches a scheduler (and never disturbs the requests running).
Sizes are checked before work that grows with them: a list's length before it is copied, a
text's length before it is tokenized. The functions here are synchronous and may take long
(tokenization): the server runs them off its event loop.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from google.protobuf import unknown_fields

from gridllm.common.chat_tools import check_tools
from gridllm.common.config import RequestLimits
from gridllm.common.contract import ModelLimits
from gridllm.common.convert import check_max_tokens, sampling_params_from_pb
from gridllm.common.sampling_params import SamplingParams
from gridllm.common.tokenizer import apply_chat_template
from gridllm.v1 import generate_pb2

# Longest client-chosen request id (it travels in logs and Redis keys).
_MAX_REQUEST_ID_LEN = 256


@dataclass
class ValidatedRequest:
    """A request ready to submit."""

    request_id: str
    # The prompt's text (None for a token-id prompt).
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int
    return_token_ids: bool


def validate_request(request: generate_pb2.GenerateRequest, tokenizer: Any | None,
                     limits: ModelLimits,
                     request_limits: RequestLimits | None = None) -> ValidatedRequest:
    """Check and tokenize one GenerateRequest.

    Args:
        request: as received.
        tokenizer: the model's tokenizer (None: token-id prompts only).
        limits: the served model's limits.
        request_limits: what one request may ask for (default: RequestLimits()).
    Returns:
        The validated request.
    Raises:
        ValueError: the message names the field, e.g. ``sampling_params.top_p must be ...``.
    """
    request_limits = request_limits or RequestLimits()
    request_id = _request_id(request)
    sampling_msg = request.sampling_params if request.HasField("sampling_params") else None
    try:
        params = sampling_params_from_pb(sampling_msg, request_limits)
        params.verify_vocab(limits.vocab_size)
    except ValueError as exc:
        raise ValueError(f"sampling_params.{exc}") from None
    add_special = (request.add_special_tokens if request.HasField("add_special_tokens")
                   else True)
    kind = request.WhichOneof("input")
    prompt: str | None = None
    if kind == "prompt":
        if not request.prompt:
            raise ValueError("prompt must not be empty.")
        prompt = request.prompt
        prompt_token_ids = tokenize_text(tokenizer, prompt, add_special, "prompt",
                                         limits.max_model_len)
    elif kind == "prompt_token_ids":
        # The length first: a list far past the context is refused before it is copied.
        check_prompt_length(request.prompt_token_ids.ids, limits.max_model_len,
                            "prompt_token_ids")
        prompt_token_ids = list(request.prompt_token_ids.ids)
        check_token_ids(prompt_token_ids, limits.vocab_size, "prompt_token_ids")
    elif kind == "chat":
        prompt_token_ids = render_chat(tokenizer, request.chat, "chat", limits.max_model_len)
    else:
        raise ValueError("prompt must be set: one of prompt, prompt_token_ids or chat.")
    check_prompt_length(prompt_token_ids, limits.max_model_len, kind or "prompt")
    try:
        params = check_max_tokens(params, sampling_msg, len(prompt_token_ids),
                                  limits.max_model_len)
    except ValueError as exc:
        raise ValueError(f"sampling_params.{exc}") from None
    return ValidatedRequest(request_id, prompt, prompt_token_ids, params, request.priority,
                            request.return_token_ids)


def _request_id(request: generate_pb2.GenerateRequest) -> str:
    if not request.HasField("request_id") or not request.request_id:
        return uuid.uuid4().hex
    request_id = request.request_id
    # ASCII: the id travels upstream in gRPC metadata, which carries printable ASCII only.
    if (len(request_id) > _MAX_REQUEST_ID_LEN or not request_id.isascii()
            or not request_id.isprintable()):
        raise ValueError(f"request_id must be at most {_MAX_REQUEST_ID_LEN} printable ASCII "
                         f"characters, got {request_id[:40]!r}.")
    return request_id


def check_token_ids(token_ids: list[int], vocab_size: int, field: str) -> None:
    """ValueError naming ``field`` if any id is outside [0, vocab_size)."""
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{field} must be token ids in [0, {vocab_size}), got {bad[:5]}.")


def check_prompt_length(token_ids: Any, max_model_len: int, field: str) -> None:
    """A prompt needs at least one token and room for one generated token."""
    if not len(token_ids):
        raise ValueError(f"{field} must not be empty (it has no tokens).")
    if len(token_ids) >= max_model_len:
        raise ValueError(f"{field} has {len(token_ids)} tokens; max_model_len is "
                         f"{max_model_len}, so prompts must be shorter than that.")


@functools.lru_cache(maxsize=16)
def max_token_chars(tokenizer: Any) -> int:
    """Most characters of input one token can stand for (an upper bound).

    A vocabulary entry is at least as long as the text it decodes to (byte-level entries
    spell each byte as one character; SentencePiece's "▁" is one space, "<0x0A>" one byte).
    A normalizer can shrink the input before it is split (NFC joins a letter and its accents
    into one character): then the bound is made four times looser.
    """
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    has_normalizer = backend is None or backend.normalizer is not None
    return max(longest, 1) * (4 if has_normalizer else 1)


def check_text_size(num_chars: int, tokenizer: Any, max_model_len: int, field: str) -> None:
    """Refuse, before tokenizing it, a text too long to fit in ``max_model_len`` tokens."""
    limit = max_model_len * max_token_chars(tokenizer)
    if num_chars > limit:
        raise ValueError(f"{field} has {num_chars} characters: more than any prompt of "
                         f"max_model_len={max_model_len} tokens can have ({limit}).")


def tokenize_text(tokenizer: Any | None, text: str, add_special_tokens: bool,
                  field: str, max_model_len: int | None = None) -> list[int]:
    """Token ids of ``text``; with ``max_model_len``, a text that cannot fit is refused
    before it is tokenized."""
    if tokenizer is None:
        raise ValueError(f"{field}: the served model has no tokenizer; send prompt_token_ids.")
    if max_model_len is not None:
        check_text_size(len(text), tokenizer, max_model_len, field)
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def render_chat(tokenizer: Any | None, chat: generate_pb2.ChatMessages, field: str,
                max_model_len: int | None = None) -> list[int]:
    """Token ids of a conversation under the tokenizer's chat template.

    Args:
        max_model_len: if given, a conversation that cannot fit in it (more messages than
            tokens, or more text than that many tokens can hold) is refused before rendering.
    Raises:
        ValueError: no messages, a message with fields this proto does not know (sent by a
            client built from a different one), an empty role, a bad tool, or no template.
    """
    if tokenizer is None:
        raise ValueError(f"{field}: the served model has no tokenizer; send prompt_token_ids.")
    _reject_unknown_fields(chat, field)
    if not chat.messages:
        raise ValueError(f"{field}.messages must not be empty.")
    if max_model_len is not None:
        if len(chat.messages) >= max_model_len:
            raise ValueError(f"{field}.messages has {len(chat.messages)} messages; "
                             f"max_model_len is {max_model_len} tokens.")
        num_chars = sum(len(m.role) + len(m.content) + sum(
            len(c.name) + len(c.arguments) for c in m.tool_calls) for m in chat.messages)
        num_chars += sum(len(t.name) + len(t.description) + len(t.parameters_json)
                         for t in chat.tools)
        check_text_size(num_chars, tokenizer, max_model_len, f"{field}.messages")
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(chat.messages):
        _reject_unknown_fields(message, f"{field}.messages[{i}]",
                               "a chat message has only 'role', 'content', 'tool_calls' and "
                               "'tool_call_id'")
        if not message.role:
            raise ValueError(f"{field}.messages[{i}].role must not be empty.")
        entry: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments or "{}"}}
                for c in message.tool_calls]
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        messages.append(entry)
    tools = [_tool(t, f"{field}.tools[{i}]") for i, t in enumerate(chat.tools)]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{field}: the served model's tokenizer has no chat template.")
    add_generation_prompt = (chat.add_generation_prompt
                             if chat.HasField("add_generation_prompt") else True)
    checked = _check_pb_tools(tools, f"{field}.tools") if tools else None
    try:
        return apply_chat_template(tokenizer, messages, add_generation_prompt, checked)
    except Exception as exc:  # template errors (jinja raise_exception) are the caller's
        raise ValueError(f"{field}: the chat template rejected the messages: {exc}") from None


# check_tools names OpenAI's nesting (tools[0].function.name); the proto's Tool is flat.
_PB_TOOL_FIELDS = re.compile(r"(tools\[\d+\])\.function\.(name|description|parameters)\b")
_PB_TOOL_NAMES = {"name": "name", "description": "description",
                  "parameters": "parameters_json"}


def _check_pb_tools(tools: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """check_tools, its errors naming the proto's fields (``chat.tools[0].name``)."""
    try:
        return check_tools(tools, field)
    except ValueError as exc:
        message = _PB_TOOL_FIELDS.sub(lambda m: f"{m[1]}.{_PB_TOOL_NAMES[m[2]]}", str(exc))
        raise ValueError(message) from None


def _tool(tool: generate_pb2.Tool, field: str) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters_json:
        try:
            function["parameters"] = json.loads(tool.parameters_json)
        except ValueError as exc:
            raise ValueError(f"{field}.parameters_json must be JSON: {exc}.") from None
    return {"type": "function", "function": function}


def _reject_unknown_fields(message: Any, field: str, hint: str = "") -> None:
    numbers = sorted({f.field_number for f in unknown_fields.UnknownFieldSet(message)})
    if numbers:
        raise ValueError(f"{field} has unknown fields (numbers {numbers})"
                         + (f"; {hint}" if hint else "") + ".")
