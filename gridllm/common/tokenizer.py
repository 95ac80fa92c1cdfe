"""Tokenizer loading (transformers) with clear errors, EOS ids and chat templates."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | None) -> Any | None:
    """A transformers tokenizer from a directory, or None if it holds no tokenizer files."""
    if path is None:
        return None
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f))
                                       for f in _TOKENIZER_FILES):
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


def apply_chat_template(tokenizer: Any, messages: list[dict[str, str]],
                        add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation under the tokenizer's chat template."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise ValueError(f"messages[{i}] must have only 'role' and 'content' fields.")
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] needs string 'role' and 'content'.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template.")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
