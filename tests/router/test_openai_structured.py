"""Structured outputs and tool calling on the router's HTTP front, through the official
``openai`` client against a scripted scheduler: what reaches the scheduler (the grammar, the
rendered tools) and how replies become ``tool_calls``, whole or streamed."""

from __future__ import annotations

import json

import pytest

from gridllm.common.chat_tools import check_tools
from gridllm.common.contract import FinishReason
from gridllm.common.convert import structured_outputs_from_pb
from gridllm.common.structured_outputs import StructuredOutputsParams
from gridllm.common.tokenizer import apply_chat_template
from tests.router.test_generate import ReplayScheduler, script
from tests.router.test_http_api import run, serving

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}},
          "required": ["b"]}


def _replies(tok, replies: dict[str, str], finish=FinishReason.STOP) -> ReplayScheduler:
    return ReplayScheduler({rid: script(rid, tok.encode(text), 3, finish, logprobs=False)
                            for rid, text in replies.items()})


def _structured(scheduler: ReplayScheduler, request_id: str) -> StructuredOutputsParams | None:
    submit = next(s for s in scheduler.submits if s.request_id == request_id)
    params = submit.sampling_params
    if not params.HasField("structured_outputs"):
        return None
    return structured_outputs_from_pb(params.structured_outputs)


def test_structured_outputs_from_every_body_source(tiny_tokenizer):
    names = ["fmt", "obj", "regex", "extra", "cmpl", "choice"]
    scheduler = _replies(tiny_tokenizer, {n: '{"b": 1}' for n in names})

    async def main():
        async with serving(tiny_tokenizer, scheduler) as (client, _):
            chat = client.chat.completions.create
            await chat(model="served", messages=MESSAGES, extra_headers={"X-Request-Id": "fmt"},
                       response_format={"type": "json_schema",
                                        "json_schema": {"name": "thing", "schema": SCHEMA}})
            await chat(model="served", messages=MESSAGES, extra_headers={"X-Request-Id": "obj"},
                       response_format={"type": "json_object"})
            await chat(model="served", messages=MESSAGES,
                       extra_headers={"X-Request-Id": "regex"},
                       extra_body={"guided_regex": r"\d+"})
            # vLLM's structured_outputs: its options apply to response_format's kind too.
            await chat(model="served", messages=MESSAGES,
                       extra_headers={"X-Request-Id": "extra"},
                       response_format={"type": "json_schema",
                                        "json_schema": {"name": "t", "schema": SCHEMA}},
                       extra_body={"structured_outputs": {"disable_any_whitespace": True}})
            await client.completions.create(
                model="served", prompt="x", extra_headers={"X-Request-Id": "cmpl"},
                extra_body={"structured_outputs": {"grammar": 'root ::= "x"'}})
            await client.completions.create(
                model="served", prompt="x", extra_headers={"X-Request-Id": "choice"},
                extra_body={"guided_choice": ["yes", "no"]})

    run(main())
    assert _structured(scheduler, "fmt") == StructuredOutputsParams(json=SCHEMA)
    assert list(_structured(scheduler, "fmt").json["properties"]) == ["b", "a"]  # key order
    assert _structured(scheduler, "obj") == StructuredOutputsParams(json_object=True)
    assert _structured(scheduler, "regex") == StructuredOutputsParams(regex=r"\d+")
    assert _structured(scheduler, "extra") == StructuredOutputsParams(
        json=SCHEMA, disable_any_whitespace=True)
    assert _structured(scheduler, "cmpl") == StructuredOutputsParams(grammar='root ::= "x"')
    assert _structured(scheduler, "choice") == StructuredOutputsParams(choice=["yes", "no"])


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format"),
    ({"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp"),
    ({"structured_outputs": {"disable_any_whitespace": True}}, "structured_outputs"),
    ({"guided_choice": []}, "guided_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]},
     "messages[0].tool_calls[0]"),
])
def test_bad_bodies_are_400_naming_the_field(tiny_tokenizer, body, param):
    async def main():
        async with serving(tiny_tokenizer, _replies(tiny_tokenizer, {})) as (client, _):
            with pytest.raises(openai.BadRequestError) as error:
                await client.chat.completions.create(
                    model="served", messages=body.pop("messages", MESSAGES), extra_body=body)
            return error.value.body

    error = run(main())
    assert error["param"] == param, error["message"]
    assert error["message"].startswith(param), error["message"]


def test_tools_are_rendered_into_the_prompt(tiny_tokenizer):
    scheduler = _replies(tiny_tokenizer, {"t": "Sunny.", "none": "Sunny."})
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]

    async def main():
        async with serving(tiny_tokenizer, scheduler) as (client, _):
            for request_id, choice in (("t", "auto"), ("none", "none")):
                await client.chat.completions.create(
                    model="served", messages=history, tools=[WEATHER, TIME],
                    tool_choice=choice, extra_headers={"X-Request-Id": request_id})

    run(main())
    submits = {s.request_id: s for s in scheduler.submits}
    expected = apply_chat_template(tiny_tokenizer, history, tools=check_tools([WEATHER, TIME]))
    assert list(submits["t"].prompt_token_ids) == expected
    prompt = tiny_tokenizer.decode(expected)
    # The tiny template knows no tools: a system turn describes them, past calls and results
    # are written in the tool-call format.
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt
    # tool_choice none: the tools are not offered.
    assert "<tools>" not in tiny_tokenizer.decode(submits["none"].prompt_token_ids)
    assert _structured(scheduler, "t") is None


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_parsed_from_replies(tiny_tokenizer, stream):
    replies = {
        "auto": "Let me look." + CALL,
        "plain": "It is sunny in Paris, I think.",
        "required": '[{"name": "get_time", "parameters": {"zone": "UTC"}}, '
                    '{"name": "get_weather", "parameters": {"city": "Rome"}}]',
        "named": '{"city": "Oslo"}',
        "bare": '{"name": "get_time", "arguments": {"zone": "CET"}}',
    }
    scheduler = _replies(tiny_tokenizer, replies)
    choices = {"auto": "auto", "plain": "auto", "required": "required", "bare": "auto",
               "named": {"type": "function", "function": {"name": "get_weather"}}}

    async def main():
        results = {}
        async with serving(tiny_tokenizer, scheduler) as (client, _):
            for request_id, choice in choices.items():
                answer = await client.chat.completions.create(
                    model="served", messages=MESSAGES, tools=[WEATHER, TIME],
                    tool_choice=choice, stream=stream,
                    extra_headers={"X-Request-Id": request_id})
                results[request_id] = [c async for c in answer] if stream else answer
        return results

    results = run(main())
    expected = {
        "auto": ("Let me look.", [("get_weather", {"city": "Paris"})], "tool_calls"),
        "plain": (replies["plain"], [], "stop"),
        "required": (None, [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome"})],
                     "tool_calls"),
        "named": (None, [("get_weather", {"city": "Oslo"})], "stop"),
        "bare": (None, [("get_time", {"zone": "CET"})], "tool_calls"),
    }
    for request_id, (content, calls, finish_reason) in expected.items():
        if stream:
            chunks = [c.choices[0] for c in results[request_id] if c.choices]
            text = "".join(c.delta.content or "" for c in chunks) or None
            streamed_calls = [t for c in chunks for t in c.delta.tool_calls or []]
            got_calls = [(t.function.name, json.loads(t.function.arguments))
                         for t in streamed_calls]
            assert [t.index for t in streamed_calls] == list(range(len(calls)))
            reason = chunks[-1].finish_reason
            if request_id == "plain":  # plain content streams as it comes
                assert sum(1 for c in chunks if c.delta.content) > 1
        else:
            message = results[request_id].choices[0].message
            text, reason = message.content, results[request_id].choices[0].finish_reason
            got_calls = [(t.function.name, json.loads(t.function.arguments))
                         for t in message.tool_calls or []]
            assert all(t.id.startswith("call_") and t.type == "function"
                       for t in message.tool_calls or [])
        assert (text, got_calls, reason) == (content, calls, finish_reason), request_id
    # What the forced choices constrained the reply to.
    assert _structured(scheduler, "named") == StructuredOutputsParams(
        json=WEATHER["function"]["parameters"])
    required = _structured(scheduler, "required").json
    assert required["type"] == "array" and required["minItems"] == 1
    assert [v["properties"]["name"]["enum"] for v in required["items"]["anyOf"]] == [
        ["get_weather"], ["get_time"]]
    assert _structured(scheduler, "auto") is None


def test_auto_streaming_holds_back_only_what_may_start_a_call(tiny_tokenizer):
    from router.openai_responses import ChoiceState

    state = ChoiceState(0, tool_mode="auto")
    assert state.streamable("Hello <tool") == "Hello "
    assert state.streamable("Hello <b>") == "Hello <b>"
    assert state.streamable("Hi." + CALL + " tail") == "Hi."
    assert state.streamable('  {"name"') == ""
    assert ChoiceState(0, tool_mode="required").streamable("[") == ""
    assert ChoiceState(0).streamable("Hello <tool") == "Hello <tool"
