"""Chat tools: rendering by templates that know tools (and by those that do not), the JSON
tool-call format and its parser, the schema a required tool choice forces."""

from __future__ import annotations

import copy
import json

import pytest

from gridllm.common.chat_tools import (
    check_tools,
    format_tool_call,
    parse_tool_calls,
    required_tool_schema,
    template_renders_tools,
)
from gridllm.common.tokenizer import apply_chat_template
from tests.e2e.tiny_model import build_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}
CALL_TURN = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
# A template that renders tools itself (as Qwen's and Llama 3.1's do), arguments as objects.
TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}|{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
    "{{ c.function.arguments.city }}{% endfor %}|{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("chat-tools-tokenizer")
    build_tokenizer(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def test_a_template_that_knows_tools_renders_them(tokenizer):
    tools_tokenizer = copy.deepcopy(tokenizer)
    tools_tokenizer.chat_template = TOOLS_TEMPLATE
    assert template_renders_tools(tools_tokenizer) and not template_renders_tools(tokenizer)
    messages = [{"role": "user", "content": "Weather?"}, CALL_TURN,
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    ids = apply_chat_template(tools_tokenizer, messages, add_generation_prompt=False,
                              tools=[WEATHER])
    assert tokenizer.decode(ids) == ("TOOLS:get_weather;|user: Weather?|"
                                     "assistant: CALL get_weather Paris|tool: sunny|")


def test_a_template_without_tools_gets_them_described(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                CALL_TURN, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = tokenizer.decode(apply_chat_template(tokenizer, messages, tools=[WEATHER]))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(check_tools([WEATHER])[0]) in text
    assert "<|im_start|>assistant\n" + format_tool_call("get_weather", {"city": "Paris"}) in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>" in text
    # Without tools a conversation renders exactly as the template alone renders it.
    plain = [{"role": "user", "content": "Hi"}]
    expected = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert apply_chat_template(tokenizer, plain) == list(expected)


@pytest.mark.parametrize("tools,match", [
    ({"a": 1}, r"^tools must be a list"),
    ([{"type": "retrieval"}], r"^tools\[0\] must be an object of type function"),
    ([{"type": "function", "function": {"name": ""}}], r"^tools\[0\]\.function\.name"),
    ([WEATHER, WEATHER], r"^tools\[1\]\.function\.name 'get_weather' is given twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}],
     r"^tools\[0\]\.function\.parameters"),
])
def test_bad_tools_name_the_field(tools, match):
    with pytest.raises(ValueError, match=match):
        check_tools(tools)


def test_parse_tool_calls():
    call = format_tool_call("f", '{"x": 1}')
    assert parse_tool_calls("Sure." + call + "\n" + format_tool_call("g", {})) == (
        "Sure.", [("f", '{"x": 1}'), ("g", "{}")])
    # A call cut short by max_tokens is no call: the text stays content.
    assert parse_tool_calls('<tool_call>\n{"name": "f", "argu') == (
        '<tool_call>\n{"name": "f", "argu', [])
    assert parse_tool_calls('[{"name": "f", "parameters": {"x": "é"}}]') == (
        None, [("f", '{"x": "é"}')])
    assert parse_tool_calls('{"name": "f", "arguments": "{\\"x\\": 2}"}') == (
        None, [("f", '{"x": 2}')])
    for text in ('{"answer": 42}', "[1, 2]", "plain text", ""):
        assert parse_tool_calls(text) == (text, [])


def test_required_tool_schema():
    jsonschema = pytest.importorskip("jsonschema")
    tools = check_tools([WEATHER, {"type": "function", "function": {"name": "now"}}])
    schema = required_tool_schema(tools)
    good = [{"name": "get_weather", "parameters": {"city": "Rome"}},
            {"name": "now", "parameters": {}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_weather", "parameters": {}}],
                [{"name": "other", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, required_tool_schema(tools, parallel=False))
