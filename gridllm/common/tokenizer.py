"""Tokenizer loading (transformers) with clear errors, EOS ids and chat templates."""

from __future__ import annotations

import logging
import os
from typing import Any

from gridllm.common.chat_tools import check_tools, prepare_messages, template_renders_tools

logger = logging.getLogger(__name__)

# What a chat message may carry (OpenAI's fields that templates read).
_MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name"}

# Files of which a directory holding a tokenizer has at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | None) -> Any | None:
    """A transformers tokenizer from a directory, or None if it holds no tokenizer files."""
    if path is None:
        return None
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f))
                                       for f in TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: token-id prompts only, empty text", path)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"tokenizer could not be loaded from {path!r}: {exc}") from exc


def eos_token_ids(tokenizer: Any | None, hf_config: Any, model_dir: str | None) -> list[int]:
    """EOS ids: the tokenizer's first, then any extra from generation_config.json/config."""
    ids: list[int] = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    candidates: list[Any] = [getattr(hf_config, "eos_token_id", None)]
    if model_dir and os.path.isdir(model_dir):
        try:
            from transformers import GenerationConfig

            candidates.insert(0, GenerationConfig.from_pretrained(model_dir).eos_token_id)
        except (OSError, ValueError):
            pass
    for value in candidates:
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    return ids


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]],
                        add_generation_prompt: bool = True,
                        tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of a conversation under the tokenizer's chat template.

    Args:
        messages: ``role`` and ``content`` each; an assistant turn may carry OpenAI
            ``tool_calls`` (its content may then be None), a ``tool`` turn ``tool_call_id``.
        tools: OpenAI function tools the model may call (``chat_tools.check_tools``): the
            template renders them, or, if it knows no tools, a system turn describes them.
    """
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - _MESSAGE_KEYS:
            raise ValueError(f"messages[{i}] must have only {sorted(_MESSAGE_KEYS)} fields.")
        content = message.get("content")
        if not isinstance(message.get("role"), str) or not (
                isinstance(content, str) or (content is None and message.get("tool_calls"))):
            raise ValueError(f"messages[{i}] needs string 'role' and 'content'.")
        _check_tool_calls(message.get("tool_calls"), f"messages[{i}].tool_calls")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template.")
    if tools is not None:
        tools = check_tools(tools)
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool"
                                    for m in messages)
    extra: dict[str, Any] = {}
    if uses_tools:
        messages, tools = prepare_messages(messages, tools, template_renders_tools(tokenizer))
        if tools:
            extra["tools"] = tools
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True, **extra)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _check_tool_calls(calls: Any, field: str) -> None:
    if calls is None:
        return
    if not isinstance(calls, list):
        raise ValueError(f"{field} must be a list of calls.")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                not isinstance(function.get("arguments", ""), (str, dict)):
            raise ValueError(f"{field}[{j}] must be {{\"type\": \"function\", \"function\": "
                             "{\"name\": ..., \"arguments\": ...}}.")
