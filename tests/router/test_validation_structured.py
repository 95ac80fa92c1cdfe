"""router.validation of structured outputs and chat tools as the gRPC front receives them:
a bad field is refused naming the proto's field; good ones reach the scheduler unchanged."""

from __future__ import annotations

import json

import pytest

from gridllm.common.chat_tools import check_tools
from gridllm.common.contract import ModelLimits
from gridllm.common.structured_outputs import MAX_SPEC_CHARS, StructuredOutputsParams
from gridllm.common.tokenizer import apply_chat_template
from gridllm.v1 import generate_pb2
from router.validation import validate_request

LIMITS = ModelLimits(max_model_len=4096, vocab_size=320, eos_token_id=1, block_size=16)
SO = generate_pb2.StructuredOutputs
SCHEMA = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"enum": ["x"]}},
          "required": ["z"]}
USER = generate_pb2.ChatMessage(role="user", content="Weather in Paris?")

BAD_STRUCTURED = [
    ("structured_outputs must set one of", SO()),
    ("structured_outputs must set exactly one", SO(json_object=False)),
    ("structured_outputs.json must be a JSON schema", SO(json="{nope")),
    ("structured_outputs.json must be a JSON object", SO(json="[1]")),
    ("structured_outputs.regex must not be empty", SO(regex="  ")),
    ("structured_outputs.grammar must not be empty", SO(grammar="")),
    ("structured_outputs.choice must list at least one", SO(choice=generate_pb2.StringList())),
    ("structured_outputs.regex must be at most", SO(regex="a" * (MAX_SPEC_CHARS + 1))),
]

BAD_TOOLS = [
    (r"chat\.tools\[0\]\.name must be", [generate_pb2.Tool(name="bad name")]),
    (r"chat\.tools\[0\]\.name must be", [generate_pb2.Tool(name="")]),
    (r"chat\.tools\[1\]\.name 'f' is given twice",
     [generate_pb2.Tool(name="f"), generate_pb2.Tool(name="f")]),
    (r"chat\.tools\[0\]\.parameters_json must be JSON",
     [generate_pb2.Tool(name="f", parameters_json="{x")]),
    (r"chat\.tools\[0\]\.parameters_json must be a JSON schema object",
     [generate_pb2.Tool(name="f", parameters_json="[1]")]),
]


@pytest.mark.parametrize("message,structured", BAD_STRUCTURED,
                         ids=[f"{i}" for i in range(len(BAD_STRUCTURED))])
def test_bad_structured_outputs_name_the_field(tiny_tokenizer, message, structured):
    request = generate_pb2.GenerateRequest(
        prompt="hi", sampling_params=generate_pb2.SamplingParams(structured_outputs=structured))
    with pytest.raises(ValueError, match=rf"^sampling_params\.{message}"):
        validate_request(request, tiny_tokenizer, LIMITS)


@pytest.mark.parametrize("structured,expected", [
    (SO(json=json.dumps(SCHEMA)), StructuredOutputsParams(json=SCHEMA)),
    (SO(regex=r"\d+", disable_any_whitespace=True),
     StructuredOutputsParams(regex=r"\d+", disable_any_whitespace=True)),
    (SO(choice=generate_pb2.StringList(values=["yes", "no"])),
     StructuredOutputsParams(choice=["yes", "no"])),
    (SO(grammar='root ::= "x"'), StructuredOutputsParams(grammar='root ::= "x"')),
    (SO(json_object=True), StructuredOutputsParams(json_object=True)),
])
def test_structured_outputs_map_to_python_params(tiny_tokenizer, structured, expected):
    request = generate_pb2.GenerateRequest(
        prompt="hi", sampling_params=generate_pb2.SamplingParams(structured_outputs=structured))
    validated = validate_request(request, tiny_tokenizer, LIMITS)
    assert validated.sampling_params.structured_outputs == expected
    if expected.json is not None:  # the schema's key order survives (it orders the output)
        assert list(validated.sampling_params.structured_outputs.json["properties"]) == ["z", "a"]


@pytest.mark.parametrize("message,tools", BAD_TOOLS, ids=[f"{i}" for i in range(len(BAD_TOOLS))])
def test_bad_tools_name_the_proto_field(tiny_tokenizer, message, tools):
    chat = generate_pb2.ChatMessages(messages=[USER], tools=tools)
    with pytest.raises(ValueError, match=rf"^{message}"):
        validate_request(generate_pb2.GenerateRequest(chat=chat), tiny_tokenizer, LIMITS)


def test_tools_and_tool_turns_render_as_the_template_does(tiny_tokenizer):
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    chat = generate_pb2.ChatMessages(messages=[
        USER,
        generate_pb2.ChatMessage(role="assistant", tool_calls=[generate_pb2.ToolCall(
            id="call_1", name="get_weather", arguments='{"city": "Paris"}')]),
        generate_pb2.ChatMessage(role="tool", content="18 C", tool_call_id="call_1"),
    ], tools=[generate_pb2.Tool(name="get_weather", description="The weather.",
                                parameters_json=json.dumps(parameters)),
              generate_pb2.Tool(name="get_time")])
    validated = validate_request(generate_pb2.GenerateRequest(chat=chat), tiny_tokenizer, LIMITS)
    tools = check_tools([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather.",
                                          "parameters": parameters}},
        {"type": "function", "function": {"name": "get_time"}}])
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}]
    assert validated.prompt_token_ids == apply_chat_template(tiny_tokenizer, messages,
                                                             tools=tools)
    prompt = tiny_tokenizer.decode(validated.prompt_token_ids)
    assert '"name": "get_time"' in prompt and "18 C" in prompt
