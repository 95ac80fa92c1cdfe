"""Hypothesis strategies for hostile OpenAI HTTP requests: bodies for ``/v1/completions``,
``/v1/chat/completions``, ``/tokenize`` and ``/detokenize`` whose every field ranges from
plausible values to the wrong JSON type, the edges of numbers (NaN and the infinities,
which Python's ``json`` writes and reads), lists past every limit and long texts; and raw
bodies that are not JSON objects at all."""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st

from tests.e2e.hostile_requests import (
    LIST_SIZES,
    MAX_MODEL_LEN,
    PRINTABLE,
    VOCAB_SIZE,
    prompt_text,
    sized_list,
)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")

HUGE_INT = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from(
    [0, -1, 2**31 - 1, 2**31, 2**63, -(2**63) - 1, MAX_MODEL_LEN, MAX_MODEL_LEN + 1]))
ODD_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                      st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]))
SCALAR = st.one_of(st.none(), st.booleans(), HUGE_INT, ODD_FLOAT, st.text(max_size=12))
# Any JSON value (NaN included): what a field gets when its type is wrong.
ANY_JSON = st.recursive(
    SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                    st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)
TOKEN_ID = st.one_of(st.integers(0, VOCAB_SIZE - 1), st.integers(VOCAB_SIZE, 400), HUGE_INT)


_PROMPT = st.one_of(prompt_text(), st.lists(prompt_text(), max_size=3),
                    sized_list(TOKEN_ID), st.lists(st.lists(TOKEN_ID, max_size=8), max_size=3),
                    st.sampled_from([MAX_MODEL_LEN - 9, MAX_MODEL_LEN, 100_000]).map(
                        lambda n: [7] * n))
_STOP = st.one_of(st.text(max_size=20), sized_list(st.text(max_size=200)))
_LOGIT_BIAS = st.one_of(
    st.dictionaries(st.one_of(st.integers(-5, 400).map(str), st.text(max_size=6)),
                    st.one_of(st.floats(-200, 200), ODD_FLOAT), max_size=4),
    LIST_SIZES.map(lambda size: {str(i): 1.0 for i in range(size)}))
_SCHEMA = st.one_of(
    st.just({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
    st.just({"type": "string", "pattern": "[a-c]{2,4}"}),
    st.dictionaries(st.sampled_from(["type", "properties", "items", "enum", "$ref",
                                     "pattern", "minLength", "anyOf"]), ANY_JSON,
                    max_size=3))
_RESPONSE_FORMAT = st.one_of(
    st.just({"type": "json_object"}), st.just({"type": "text"}),
    st.builds(lambda schema, name: {"type": "json_schema",
                                    "json_schema": {"name": name, "schema": schema}},
              _SCHEMA, st.text(max_size=8)),
    st.dictionaries(st.sampled_from(["type", "json_schema", "schema"]), ANY_JSON, max_size=2))
_STRUCTURED = st.dictionaries(
    st.sampled_from(["json", "regex", "choice", "grammar", "json_object",
                     "disable_any_whitespace", "whitespace_pattern"]),
    st.one_of(_SCHEMA, st.text(max_size=16), st.lists(st.text(max_size=6), max_size=3),
              st.booleans(), ANY_JSON), max_size=2)
_TOOL = st.one_of(
    st.builds(lambda name, params: {"type": "function", "function": {
        "name": name, "description": "d", "parameters": params}},
        st.sampled_from(["get_weather", "f", "", "x" * 70]), _SCHEMA),
    ANY_JSON)

# Sampling fields of both endpoints: (plausible values, edge values or None).
_SAMPLING = {
    "max_tokens": (st.integers(1, 8), HUGE_INT),
    "temperature": (st.floats(0, 2), ODD_FLOAT),
    "top_p": (st.floats(0.01, 1), ODD_FLOAT),
    "n": (st.integers(1, 3), st.one_of(st.sampled_from([0, 128, 129, 100_000]), HUGE_INT)),
    "seed": (st.integers(0, 2**31), HUGE_INT),
    "stop": (st.one_of(st.text(min_size=1, max_size=4),
                       st.lists(st.text(min_size=1, max_size=6), max_size=3)),
             _STOP),
    "presence_penalty": (st.floats(-2, 2), ODD_FLOAT),
    "frequency_penalty": (st.floats(-2, 2), ODD_FLOAT),
    "logit_bias": (st.dictionaries(st.integers(0, VOCAB_SIZE - 1).map(str),
                                   st.floats(-100, 100), max_size=3), _LOGIT_BIAS),
    "user": (st.text(max_size=20), None),
    "top_k": (st.integers(-1, 50), HUGE_INT),
    "min_p": (st.floats(0, 1), ODD_FLOAT),
    "repetition_penalty": (st.floats(0.5, 2), ODD_FLOAT),
    "min_tokens": (st.integers(0, 4), HUGE_INT),
    "ignore_eos": (st.booleans(), None),
    "stop_token_ids": (st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=3),
                       sized_list(TOKEN_ID)),
    "skip_special_tokens": (st.booleans(), None),
    "include_stop_str_in_output": (st.booleans(), None),
    "allowed_token_ids": (st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=5),
                          sized_list(TOKEN_ID)),
    "prompt_logprobs": (st.integers(0, 5), HUGE_INT),
    "priority": (st.integers(-5, 5), HUGE_INT),
    "request_id": (st.text(PRINTABLE, max_size=20), st.text(min_size=250, max_size=300)),
    "stream": (st.booleans(), None),
    "stream_options": (st.just({"include_usage": True}),
                       st.dictionaries(st.text(max_size=14), ANY_JSON, max_size=2)),
    "best_of": (st.integers(1, 2), st.integers(-1, 4)),
    "add_special_tokens": (st.booleans(), None),
    "return_token_ids": (st.booleans(), None),
    "response_format": (st.sampled_from([{"type": "json_object"}, {"type": "text"}]),
                        _RESPONSE_FORMAT),
    "structured_outputs": (st.just({"choice": ["yes", "no"]}), _STRUCTURED),
    "guided_json": (st.just({"type": "object", "properties": {"a": {"type": "integer"}}}),
                    _SCHEMA),
    "guided_regex": (st.just("[a-c]{1,4}"), st.text(max_size=16)),
    "guided_choice": (st.just(["red", "green"]), st.lists(st.text(max_size=6), max_size=4)),
    "guided_grammar": (st.just('root ::= "a" | "b"'), st.text(max_size=40)),
}
_COMPLETION_ONLY = {
    "logprobs": (st.integers(0, 5), HUGE_INT),
    "echo": (st.booleans(), None),
    "suffix": (st.text(max_size=8), None),
}
_ROLES = st.sampled_from(["user", "assistant", "system", "tool", "", "x" * 40])
_CONTENT = st.one_of(
    prompt_text(), st.none(),
    st.lists(st.one_of(st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=30)),
                       st.just({"type": "image_url", "image_url": {"url": "x"}}), ANY_JSON),
             max_size=3))
_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": _ROLES, "content": _CONTENT}, optional={
        "tool_calls": st.lists(st.one_of(st.just({"id": "c", "type": "function", "function": {
            "name": "f", "arguments": "{}"}}), ANY_JSON), max_size=2),
        "tool_call_id": st.text(max_size=6), "name": ANY_JSON}),
    ANY_JSON)
_MESSAGES = (st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                             "content": st.text(max_size=40)}),
                      min_size=1, max_size=3),
             st.one_of(st.lists(_MESSAGE, max_size=4), st.sampled_from([5000, 100_000]).map(
                 lambda n: [{"role": "user", "content": "hi"}] * n)))
_CHAT_ONLY = {
    "max_completion_tokens": (st.integers(1, 8), HUGE_INT),
    "logprobs": (st.booleans(), None),
    "top_logprobs": (st.integers(0, 5), HUGE_INT),
    "add_generation_prompt": (st.booleans(), None),
    "tools": (st.lists(_TOOL.filter(lambda t: isinstance(t, dict) and "function" in t),
                       max_size=2), st.lists(_TOOL, max_size=3)),
    "tool_choice": (st.sampled_from(["none", "auto"]), st.one_of(
        st.sampled_from(["required", "x"]),
        st.just({"type": "function", "function": {"name": "f"}}), ANY_JSON)),
    "parallel_tool_calls": (st.booleans(), None),
}
_PROMPTS = (st.one_of(st.text(min_size=1, max_size=60),
                      st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=20)),
            _PROMPT)


@st.composite
def _value(draw, entry: tuple, hostile: bool):
    """A field's value: plausible, or (in a hostile body, one time in two) an edge value
    or any JSON at all."""
    plausible, edges = entry
    choice = draw(st.integers(0, 3)) if hostile else 0
    if choice <= 1:
        return draw(plausible)
    if choice == 2 and edges is not None:
        return draw(edges)
    return draw(ANY_JSON)


@st.composite
def _fields(draw, table: dict, hostile: bool) -> dict:
    body = {}
    for name, entry in table.items():
        if draw(st.integers(0, 5)) == 0:  # one field in six is set
            body[name] = draw(_value(entry, hostile))
    return body


@st.composite
def http_requests(draw, model: str) -> tuple[str, bytes]:
    """(path, body): a JSON body for one of ``ENDPOINTS`` naming ``model`` (mostly); one
    body in two is plausible in every field, the others hostile."""
    path = draw(st.sampled_from(ENDPOINTS))
    hostile = draw(st.booleans())
    body: dict = {}
    if draw(st.integers(0, 9)):
        body["model"] = model
    elif hostile and draw(st.booleans()):
        body["model"] = draw(ANY_JSON)
    if path == "/v1/completions":
        body["prompt"] = draw(_value(_PROMPTS, hostile))
        body.update(draw(_fields({**_SAMPLING, **_COMPLETION_ONLY}, hostile)))
    elif path == "/v1/chat/completions":
        body["messages"] = draw(_value(_MESSAGES, hostile))
        body.update(draw(_fields({**_SAMPLING, **_CHAT_ONLY}, hostile)))
    elif path == "/tokenize":
        if draw(st.booleans()):
            body["prompt"] = draw(_value((st.text(max_size=60), prompt_text()), hostile))
        else:
            body["messages"] = draw(_value(_MESSAGES, hostile))
        body.update(draw(_fields({"add_special_tokens": (st.booleans(), None),
                                  "add_generation_prompt": (st.booleans(), None)}, hostile)))
    else:
        body["tokens"] = draw(_value((
            st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=20),
            st.one_of(sized_list(TOKEN_ID), st.sampled_from(
                [MAX_MODEL_LEN, 100_000, 1_000_000]).map(lambda n: [7] * n))), hostile))
    if hostile and draw(st.integers(0, 9)) == 0:  # an unknown field
        body[draw(st.text(min_size=1, max_size=12))] = draw(ANY_JSON)
    elif not hostile and path.startswith("/v1/"):
        _fit_together(body, draw(st.integers(1, 8)))
    return path, json.dumps(body).encode()


_STRUCTURED_KINDS = ("response_format", "structured_outputs", "guided_json", "guided_regex",
                     "guided_choice", "guided_grammar")


def _fit_together(body: dict, max_tokens: int) -> None:
    """Makes a plausible body's fields agree with one another, so that most such requests
    run: one structured output kind, stream options only on a stream, top log-probabilities
    with log-probabilities, no suffix, at most ``max_tokens`` tokens (a chat's default is
    the rest of the context)."""
    for kind in [k for k in _STRUCTURED_KINDS if k in body][1:]:
        del body[kind]
    if "stream_options" in body:
        body["stream"] = True
    if "top_logprobs" in body:
        body["logprobs"] = True
    body.pop("suffix", None)
    limit = body.get("max_tokens", body.get("max_completion_tokens", max_tokens))
    body["max_tokens" if "max_completion_tokens" not in body else "max_completion_tokens"] = limit
    if "min_tokens" in body:
        body["min_tokens"] = min(body["min_tokens"], limit)


# Bodies that are not a JSON object: bytes, other JSON values, truncated objects.
raw_bodies = st.one_of(
    st.binary(max_size=200),
    ANY_JSON.map(lambda value: json.dumps(value).encode()),
    st.text(max_size=60).map(lambda text: ('{"prompt": "' + text).encode()),
    st.just(b'{"prompt": "\xff\xfe"}'),
    st.just(b""),
)
