"""GenerateRequest -> a validated prompt and SamplingParams; errors name the bad field.

Every check the scheduler would make is made here first, so a bad request is refused with
INVALID_ARGUMENT before it reaches a scheduler (and never disturbs the requests running).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from google.protobuf import unknown_fields

from gridllm.common.contract import ModelLimits
from gridllm.common.convert import sampling_params_from_pb
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
                     limits: ModelLimits) -> ValidatedRequest:
    """Check and tokenize one GenerateRequest.

    Args:
        request: as received.
        tokenizer: the model's tokenizer (None: token-id prompts only).
        limits: the served model's limits.
    Returns:
        The validated request.
    Raises:
        ValueError: the message names the field, e.g. ``sampling_params.top_p must be ...``.
    """
    request_id = _request_id(request)
    try:
        params = sampling_params_from_pb(
            request.sampling_params if request.HasField("sampling_params") else None)
    except ValueError as exc:
        raise ValueError(f"sampling_params.{exc}") from None
    try:
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
        prompt_token_ids = tokenize_text(tokenizer, prompt, add_special, "prompt")
    elif kind == "prompt_token_ids":
        prompt_token_ids = list(request.prompt_token_ids.ids)
        check_token_ids(prompt_token_ids, limits.vocab_size, "prompt_token_ids")
    elif kind == "chat":
        prompt_token_ids = render_chat(tokenizer, request.chat, "chat")
    else:
        raise ValueError("prompt must be set: one of prompt, prompt_token_ids or chat.")
    check_prompt_length(prompt_token_ids, limits.max_model_len, kind or "prompt")
    return ValidatedRequest(request_id, prompt, prompt_token_ids, params, request.priority,
                            request.return_token_ids)


def _request_id(request: generate_pb2.GenerateRequest) -> str:
    if not request.HasField("request_id") or not request.request_id:
        return uuid.uuid4().hex
    request_id = request.request_id
    if len(request_id) > _MAX_REQUEST_ID_LEN or not request_id.isprintable():
        raise ValueError(f"request_id must be at most {_MAX_REQUEST_ID_LEN} printable "
                         f"characters, got {request_id[:40]!r}.")
    return request_id


def check_token_ids(token_ids: list[int], vocab_size: int, field: str) -> None:
    """ValueError naming ``field`` if any id is outside [0, vocab_size)."""
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{field} must be token ids in [0, {vocab_size}), got {bad[:5]}.")


def check_prompt_length(token_ids: list[int], max_model_len: int, field: str) -> None:
    """A prompt needs at least one token and room for one generated token."""
    if not token_ids:
        raise ValueError(f"{field} must not be empty (it has no tokens).")
    if len(token_ids) >= max_model_len:
        raise ValueError(f"{field} has {len(token_ids)} tokens; max_model_len is "
                         f"{max_model_len}, so prompts must be shorter than that.")


def tokenize_text(tokenizer: Any | None, text: str, add_special_tokens: bool,
                  field: str) -> list[int]:
    if tokenizer is None:
        raise ValueError(f"{field}: the served model has no tokenizer; send prompt_token_ids.")
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def render_chat(tokenizer: Any | None, chat: generate_pb2.ChatMessages, field: str) -> list[int]:
    """Token ids of a conversation under the tokenizer's chat template.

    Raises:
        ValueError: no messages, a message with fields other than role and content (sent
            by a client built from a different proto), an empty role, or no template.
    """
    if tokenizer is None:
        raise ValueError(f"{field}: the served model has no tokenizer; send prompt_token_ids.")
    _reject_unknown_fields(chat, field)
    if not chat.messages:
        raise ValueError(f"{field}.messages must not be empty.")
    messages = []
    for i, message in enumerate(chat.messages):
        _reject_unknown_fields(message, f"{field}.messages[{i}]",
                               "a chat message has only 'role' and 'content'")
        if not message.role:
            raise ValueError(f"{field}.messages[{i}].role must not be empty.")
        messages.append({"role": message.role, "content": message.content})
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{field}: the served model's tokenizer has no chat template.")
    add_generation_prompt = (chat.add_generation_prompt
                             if chat.HasField("add_generation_prompt") else True)
    try:
        return apply_chat_template(tokenizer, messages, add_generation_prompt)
    except Exception as exc:  # template errors (jinja raise_exception) are the caller's
        raise ValueError(f"{field}: the chat template rejected the messages: {exc}") from None


def _reject_unknown_fields(message: Any, field: str, hint: str = "") -> None:
    numbers = sorted({f.field_number for f in unknown_fields.UnknownFieldSet(message)})
    if numbers:
        raise ValueError(f"{field} has unknown fields (numbers {numbers})"
                         + (f"; {hint}" if hint else "") + ".")
