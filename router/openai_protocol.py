"""OpenAI request bodies -> ``GenerateRequest``s, so both fronts share one validation.

``/v1/completions`` and ``/v1/chat/completions`` bodies are read with OpenAI's field names
(``max_tokens``/``max_completion_tokens``, ``stop``, ``n``, ``seed``, ``logprobs``/
``top_logprobs``, ``logit_bias``, the penalties, ``user``) plus vLLM's extras (``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``priority``, ``ignore_eos``...). The
sampling fields become a ``SamplingParams`` (whose checks name the field), the prompt a
``GenerateRequest``, which ``router.validation.validate_request`` checks as it checks a gRPC
request. Every refusal is an ``ApiError`` naming the field (``param``).

Structured outputs come from OpenAI's ``response_format`` (``json_object``, ``json_schema``),
vLLM's ``structured_outputs`` object (its kind, and options such as
``disable_any_whitespace`` that also apply to the other sources) and vLLM's older
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``; one kind per
request. Chat ``tools`` are rendered by the chat template; ``tool_choice`` ``required`` or a
named function forces the call with a JSON-schema grammar (``gridllm.common.chat_tools``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from gridllm.common.chat_tools import check_tools, required_tool_schema
from gridllm.common.convert import sampling_params_to_pb
from gridllm.common.sampling_params import SamplingParams
from gridllm.common.structured_outputs import KINDS, StructuredOutputsParams
from gridllm.v1 import generate_pb2
from router.engine_client import HTTP_STATUS, RequestFailure

logger = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1
# OpenAI's limits on the number of top log-probabilities.
MAX_COMPLETION_LOGPROBS = 20
MAX_CHAT_TOP_LOGPROBS = 20

# Body field -> SamplingParams field, shared by both endpoints.
_SAMPLING_FIELDS = {
    "n": "n", "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "logit_bias": "logit_bias",
    # vLLM's extras
    "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_tokens", "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids",
    "skip_special_tokens": "skip_special_tokens",
    "include_stop_str_in_output": "include_stop_str_in_output",
    "allowed_token_ids": "allowed_token_ids", "prompt_logprobs": "prompt_logprobs",
}
_INT32_FIELDS = ("n", "top_k", "max_tokens", "max_completion_tokens", "min_tokens", "logprobs",
                 "top_logprobs", "prompt_logprobs", "priority")
# Fields read elsewhere, or accepted and ignored (``user`` is logged).
_COMMON_FIELDS = {"model", "stream", "stream_options", "user", "priority", "request_id",
                  "max_tokens", "logprobs", "best_of", "add_special_tokens",
                  "spaces_between_special_tokens", "return_token_ids"}
# vLLM's older names of the structured output kinds.
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}
_STRUCTURED_FIELDS = {"response_format", "structured_outputs", "guided_decoding_backend",
                      *_GUIDED_FIELDS}
_COMPLETION_FIELDS = _COMMON_FIELDS | _STRUCTURED_FIELDS | {"prompt", "echo", "suffix"}
_CHAT_FIELDS = _COMMON_FIELDS | _STRUCTURED_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "add_generation_prompt",
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"}
_TOOL_CHOICES = ("none", "auto", "required")


class ApiError(Exception):
    """An OpenAI error answer.

    Args:
        status: the HTTP status.
        message: what is wrong (naming the field).
        param: the request field at fault, if any.
        error_type: OpenAI's error type.
        code: OpenAI's error code, if any.
        headers: extra response headers (Retry-After).
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 error_type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.error_type = error_type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
                499: "client_closed_request", 503: "service_unavailable_error",
                504: "timeout_error"}


def failure_error(failure: RequestFailure) -> ApiError:
    """The OpenAI error answer of a failed request (429 carries the retry hint)."""
    status = HTTP_STATUS.get(failure.code, 500)
    headers = {}
    if failure.retry_after_ms is not None:
        headers = {"Retry-After": str(max(1, math.ceil(failure.retry_after_ms / 1000))),
                   "retry-after-ms": str(failure.retry_after_ms)}
    return ApiError(status, failure.details, None, _ERROR_TYPES.get(status, "server_error"),
                    failure.code.name.lower(), headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def param_of(message: str) -> str | None:
    """The field a validation message starts with (``sampling_params.top_p must ...`` ->
    ``top_p``; ``chat.messages[0].role ...`` -> ``messages[0].role``)."""
    match = re.match(r"([A-Za-z_][\w.\[\]]*)", message)
    if match is None:
        return None
    param = match.group(1).rstrip(".:")
    for prefix in ("sampling_params.", "chat."):
        if param.startswith(prefix):
            param = param[len(prefix):]
    return {"prompt_token_ids": "prompt", "chat": "messages"}.get(param, param)


@dataclass
class ParsedRequest:
    """One OpenAI request, ready to run: a GenerateRequest per prompt."""

    requests: list[generate_pb2.GenerateRequest]
    # The texts of the prompts (echo), None for token-id prompts.
    prompt_texts: list[str | None]
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    # Completions: top log-probs per token (None: none). Chat: set when logprobs is true.
    num_logprobs: int | None
    # Chat with tools: how the reply's tool calls are read ("auto", "required", or "named"
    # for a function named in tool_choice); None: no tools (or tool_choice "none").
    tool_mode: str | None = None
    # The function a named tool_choice forces.
    tool_name: str | None = None


def _body_field(body: dict, name: str, kind: type | tuple[type, ...], what: str,
                default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise bad_request(f"{name} must be {what}, got {value!r}.", name)
    if not isinstance(value, kind):
        raise bad_request(f"{name} must be {what}, got {value!r}.", name)
    return value


def _check_int32(body: dict) -> None:
    for name in _INT32_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and not (
                -_INT32_MAX - 1 <= value <= _INT32_MAX):
            raise bad_request(f"{name} must fit in a 32-bit integer, got {value}.", name)


def _sampling_params(body: dict, max_tokens: Any, logprobs: int | None,
                     forced: tuple[str, dict[str, Any]] | None = None) -> SamplingParams:
    values: dict[str, Any] = {field: body[key] for key, field in _SAMPLING_FIELDS.items()
                              if body.get(key) is not None}
    structured = _structured_outputs(body, forced)
    if structured is not None:
        values["structured_outputs"] = structured
    if isinstance(values.get("logit_bias"), dict):
        values["logit_bias"] = {(int(k) if isinstance(k, str) and k.strip().isdigit() else k): v
                                for k, v in values["logit_bias"].items()}
    best_of = body.get("best_of")
    if best_of is not None and best_of != values.get("n", 1):
        raise bad_request(f"best_of must equal n (or be left out), got {best_of!r}.", "best_of")
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **values)
    except (TypeError, ValueError) as exc:
        raise bad_request(str(exc), param_of(str(exc))) from None


def _structured_outputs(body: dict, forced: tuple[str, dict[str, Any]] | None = None
                        ) -> StructuredOutputsParams | None:
    """The one structured output the body asks for, from any of its sources.

    Args:
        forced: ``(field, schema)`` of a forced tool call (the field that forced it).
    """
    values: dict[str, Any] = {}
    # kind -> the body field that set it (named in errors).
    sources: dict[str, str] = {}

    def set_kind(kind: str, value: Any, field: str) -> None:
        if kind in sources:
            raise bad_request(f"{field} cannot be combined with {sources[kind]}: a request "
                              "has one structured output.", field)
        values[kind], sources[kind] = value, field

    extra = _body_field(body, "structured_outputs", dict, "an object")
    for key, value in (extra or {}).items():
        if value is not None:
            values[key] = value
            if key in KINDS and value is not False:
                sources[key] = f"structured_outputs.{key}"
    for field, kind in _GUIDED_FIELDS.items():
        if body.get(field) is not None:
            set_kind(kind, body[field], field)
    response_format = _response_format(body.get("response_format"))
    if response_format is not None:
        set_kind(*response_format)
    if forced is not None:
        set_kind("json", forced[1], forced[0])
    if not values:
        return None
    kinds = [k for k in KINDS if k in sources]
    if len(kinds) > 1:
        raise bad_request(f"{sources[kinds[1]]} cannot be combined with {sources[kinds[0]]}: "
                          "a request has one structured output.", sources[kinds[1]])
    try:
        return StructuredOutputsParams.from_dict(values)
    except ValueError as exc:
        message = str(exc)
        if kinds:
            # Named as the body names it (response_format.json_schema.schema, guided_regex).
            prefix, field = f"structured_outputs.{kinds[0]}", sources[kinds[0]]
            if message.startswith(prefix) and field != prefix:
                raise bad_request(field + message[len(prefix):], field) from None
        raise bad_request(message, param_of(message)) from None


def _response_format(response_format: Any) -> tuple[str, Any, str] | None:
    """OpenAI's response_format as ``(kind, value, field)``; None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise bad_request("response_format must be an object with a type.", "response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", True, "response_format"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object with name and "
                              "schema.", "response_format.json_schema")
        schema = spec.get("schema", {"type": "object"})
        return "json", schema, "response_format.json_schema.schema"
    raise bad_request(f"response_format.type must be text, json_object or json_schema, got "
                      f"{kind!r}.", "response_format.type")


def _stream_options(body: dict, stream: bool) -> bool:
    options = _body_field(body, "stream_options", dict, "an object")
    if options is None:
        return False
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true.",
                          "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad_request(f"stream_options.include_usage must be a boolean, got {include!r}.",
                          "stream_options.include_usage")
    return include


def _base_request(body: dict, params: SamplingParams, request_id: str
                  ) -> generate_pb2.GenerateRequest:
    priority = _body_field(body, "priority", int, "an integer", 0)
    return_token_ids = _body_field(body, "return_token_ids", bool, "a boolean", False)
    return generate_pb2.GenerateRequest(
        request_id=request_id, sampling_params=sampling_params_to_pb(params), priority=priority,
        return_token_ids=return_token_ids)


def _warn_ignored(body: dict, known: set[str]) -> None:
    unknown = sorted(set(body) - known - set(_SAMPLING_FIELDS))
    if unknown:
        logger.debug("ignoring unknown request fields %s", unknown)


def parse_completion(body: dict, request_id: str) -> ParsedRequest:
    """A ``/v1/completions`` body (ApiError 400 naming the field when it is wrong)."""
    _warn_ignored(body, _COMPLETION_FIELDS)
    _check_int32(body)
    if body.get("suffix") is not None:
        raise bad_request("suffix is not supported.", "suffix")
    stream = bool(_body_field(body, "stream", bool, "a boolean", False))
    echo = bool(_body_field(body, "echo", bool, "a boolean", False))
    logprobs = _body_field(body, "logprobs", int, "an integer", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got "
                          f"{logprobs}.", "logprobs")
    if echo and logprobs is not None:
        raise bad_request("echo together with logprobs is not supported.", "echo")
    max_tokens = body.get("max_tokens", 16)
    params = _sampling_params(body, max_tokens, logprobs)
    add_special = _body_field(body, "add_special_tokens", bool, "a boolean", True)
    prompts = _prompts(body.get("prompt"))
    requests, texts = [], []
    for i, prompt in enumerate(prompts):
        sub_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
        request = _base_request(body, params, sub_id)
        request.add_special_tokens = add_special
        if isinstance(prompt, str):
            request.prompt = prompt
            texts.append(prompt)
        else:
            request.prompt_token_ids.ids.extend(prompt)
            texts.append(None)
        requests.append(request)
    return ParsedRequest(requests, texts, params.n, stream, _stream_options(body, stream), echo,
                         logprobs)


def _prompts(prompt: Any) -> list[str | list[int]]:
    """``prompt`` as a list: a string, a list of strings, token ids or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(_is_token(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a "
                      f"list of lists of token ids, got {str(prompt)[:80]}.", "prompt")


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _INT32_MAX


def parse_chat(body: dict, request_id: str) -> ParsedRequest:
    """A ``/v1/chat/completions`` body (ApiError 400 naming the field when it is wrong)."""
    _warn_ignored(body, _CHAT_FIELDS)
    _check_int32(body)
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise bad_request(f"{name} is deprecated and not supported; use tools and "
                              "tool_choice.", name)
    tools, tool_mode, tool_name, forced = _tools(body)
    stream = bool(_body_field(body, "stream", bool, "a boolean", False))
    has_logprobs = bool(_body_field(body, "logprobs", bool, "a boolean", False))
    top_logprobs = _body_field(body, "top_logprobs", int, "an integer", None)
    if top_logprobs is not None:
        if not has_logprobs:
            raise bad_request("top_logprobs needs logprobs set to true.", "top_logprobs")
        if not 0 <= top_logprobs <= MAX_CHAT_TOP_LOGPROBS:
            raise bad_request(f"top_logprobs must be in [0, {MAX_CHAT_TOP_LOGPROBS}], got "
                              f"{top_logprobs}.", "top_logprobs")
    num_logprobs = (top_logprobs or 0) if has_logprobs else None
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    params = _sampling_params(body, max_tokens, num_logprobs, forced)
    request = _base_request(body, params, request_id)
    request.chat.CopyFrom(chat_messages(body.get("messages")))
    for tool in tools:
        function = tool["function"]
        request.chat.tools.add(name=function["name"],
                               description=function.get("description", ""),
                               parameters_json=json.dumps(function["parameters"]))
    add_generation_prompt = _body_field(body, "add_generation_prompt", bool, "a boolean", True)
    request.chat.add_generation_prompt = add_generation_prompt
    # A chat template writes the special tokens itself.
    request.add_special_tokens = _body_field(body, "add_special_tokens", bool, "a boolean",
                                             False)
    return ParsedRequest([request], [None], params.n, stream, _stream_options(body, stream),
                         False, num_logprobs, tool_mode, tool_name)


def _tools(body: dict) -> tuple[list[dict[str, Any]], str | None, str | None,
                                tuple[str, dict[str, Any]] | None]:
    """``(tools to render, tool_mode, forced function name, (field, forced schema))``."""
    choice = body.get("tool_choice")
    if not body.get("tools"):
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools.", "tool_choice")
        return [], None, None, None
    try:
        tools = check_tools(body["tools"])
    except ValueError as exc:
        raise bad_request(str(exc), param_of(str(exc))) from None
    parallel = _body_field(body, "parallel_tool_calls", bool, "a boolean", True)
    if choice is None or choice == "auto":
        return tools, "auto", None, None
    if choice == "none":
        return [], None, None, None  # not offered: the model answers in text
    if choice == "required":
        return tools, "required", None, ("tool_choice", required_tool_schema(tools, parallel))
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
            function, dict):
        name = function.get("name")
        named = [t["function"] for t in tools if t["function"]["name"] == name]
        if not named:
            raise bad_request(f"tool_choice.function.name must name one of the tools, got "
                              f"{name!r}.", "tool_choice.function.name")
        return tools, "named", name, ("tool_choice", named[0]["parameters"])
    raise bad_request(f"tool_choice must be one of {', '.join(_TOOL_CHOICES)} or "
                      '{"type": "function", "function": {"name": ...}}, got '
                      f"{str(choice)[:80]}.", "tool_choice")


def chat_messages(messages: Any, field: str = "messages") -> generate_pb2.ChatMessages:
    """OpenAI messages -> ChatMessages (content parts of type text are joined)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request(f"{field} must be a non-empty list of messages.", field)
    out = generate_pb2.ChatMessages()
    for i, message in enumerate(messages):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{name} must be an object with role and content.", name)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"{name}.role must be a non-empty string, got {role!r}.",
                              f"{name}.role")
        entry = out.messages.add(role=role, content=_content_text(message.get("content"),
                                                                  f"{name}.content"))
        _tool_calls(message.get("tool_calls"), entry, f"{name}.tool_calls")
        tool_call_id = message.get("tool_call_id")
        if tool_call_id is not None:
            if not isinstance(tool_call_id, str):
                raise bad_request(f"{name}.tool_call_id must be a string.",
                                  f"{name}.tool_call_id")
            entry.tool_call_id = tool_call_id
    return out


def _tool_calls(calls: Any, entry: generate_pb2.ChatMessage, field: str) -> None:
    """An assistant turn's OpenAI ``tool_calls`` into ``entry``."""
    if calls is None:
        return
    if not isinstance(calls, list):
        raise bad_request(f"{field} must be a list of calls.", field)
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                not isinstance(arguments, (str, dict)):
            raise bad_request(f"{field}[{j}] must be {{\"type\": \"function\", \"function\": "
                              '{"name": ..., "arguments": ...}}.', f"{field}[{j}]")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments)
        entry.tool_calls.add(id=str(call.get("id") or ""), name=function["name"],
                             arguments=arguments)


def _content_text(content: Any, field: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{field}[{j}] must be a text part ({{\"type\": \"text\", "
                                  f"\"text\": ...}}); got type {kind!r}.", f"{field}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{field} must be a string or a list of text parts.", field)
