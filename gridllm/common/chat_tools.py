"""Tool calling in chat: the tools a template renders, the JSON tool-call format, parsing.

Tools and calls use OpenAI's shapes: a tool is ``{"type": "function", "function": {"name",
"description", "parameters"}}``, an assistant turn's call ``{"id", "type": "function",
"function": {"name", "arguments"}}`` with the arguments as JSON text. A chat template that
knows tools (Qwen, Llama 3.1, Hermes, ...) renders them itself, with each call's arguments as
an object as Hugging Face templates expect. For a template that does not, the tools are
described in the system turn and the model is asked for the JSON tool-call format that
``parse_tool_calls`` reads::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``parse_tool_calls`` also reads a bare ``{"name": ..., "arguments"|"parameters": ...}`` object
or a list of them (Llama 3.1's JSON calls, and the array a required tool choice forces).
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_END)
                    + r"|$)", re.DOTALL)

_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def check_tools(tools: Any, field: str = "tools") -> list[dict[str, Any]]:
    """OpenAI ``tools`` checked and normalised (``parameters`` defaults to any object);
    ValueError naming the field (``tools[1].function.name``) otherwise."""
    if not isinstance(tools, list):
        raise ValueError(f"{field} must be a list of tools, got {type(tools).__name__}.")
    normalised, names = [], set()
    for i, tool in enumerate(tools):
        name = f"{field}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"{name} must be an object of type function.")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"{name}.function must be an object.")
        fname = function.get("name")
        if not isinstance(fname, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", fname):
            raise ValueError(f"{name}.function.name must be 1-64 letters, digits, '_', '-', "
                             f"'.' or ':', got {fname!r}.")
        if fname in names:
            raise ValueError(f"{name}.function.name {fname!r} is given twice.")
        names.add(fname)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"{name}.function.description must be a string.")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ValueError(f"{name}.function.parameters must be a JSON schema object.")
        entry: dict[str, Any] = {"name": fname, "parameters": parameters}
        if description:
            entry["description"] = description
        normalised.append({"type": "function", "function": entry})
    return normalised


def template_renders_tools(tokenizer: Any) -> bool:
    """True if the tokenizer's chat template reads ``tools`` (else gridllm describes them)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or " ".join(template.values())
    return isinstance(template, str) and "tools" in template


def format_tool_call(name: str, arguments: Any) -> str:
    """One call in the JSON tool-call format (``arguments``: an object or its JSON text)."""
    if isinstance(arguments, str):
        arguments = _loads(arguments, {})
    return (f"{TOOL_CALL_START}\n{json.dumps({'name': name, 'arguments': arguments})}\n"
            f"{TOOL_CALL_END}")


def prepare_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     renders_tools: bool
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (and tools) as the chat template gets them.

    A template that renders tools gets the calls with object arguments (Hugging Face's
    convention); for one that does not, the tools become a system turn, past calls the JSON
    tool-call format and tool results user turns in ``<tool_response>`` tags.
    """
    out = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None) or []
        if renders_tools:
            if calls:
                message["tool_calls"] = [
                    {"id": c.get("id", ""), "type": "function",
                     "function": {"name": c["function"]["name"],
                                  "arguments": _loads(c["function"]["arguments"], {})}}
                    for c in calls]
            if message.get("content") is None:
                message["content"] = ""
            out.append(message)
            continue
        message.pop("tool_call_id", None)
        parts = [message.get("content") or ""]
        parts += [format_tool_call(c["function"]["name"], c["function"]["arguments"])
                  for c in calls]
        content = "\n".join(p for p in parts if p)
        if message["role"] == "tool":
            message["role"] = "user"
            content = f"<tool_response>\n{content}\n</tool_response>"
        message["content"] = content
        out.append(message)
    if renders_tools or not tools:
        return out, tools or None
    prompt = _TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None


def parse_tool_calls(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The calls in a reply: ``(content outside them or None, [(name, arguments JSON)])``.

    A reply with no well-formed call is all content.
    """
    calls: list[tuple[str, str]] = []
    if TOOL_CALL_START in text:
        for body in _BLOCK.findall(text):
            calls += _calls_in(_loads(body, None))
        if calls:
            content = text[:text.index(TOOL_CALL_START)].strip()
            return content or None, calls
        return text, []
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        calls = _calls_in(_loads(stripped, None))
        if calls:
            return None, calls
    return text, []


def _calls_in(value: Any) -> list[tuple[str, str]]:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _loads(arguments, arguments)
        calls.append((item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


def required_tool_schema(tools: list[dict[str, Any]], parallel: bool = True
                         ) -> dict[str, Any]:
    """The JSON schema a ``required`` tool choice forces: a list of calls of the tools."""
    variants = [{"type": "object",
                 "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                "parameters": t["function"]["parameters"]},
                 "required": ["name", "parameters"]} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": variants[0] if len(variants) == 1 else
                              {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _loads(text: Any, default: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return default
