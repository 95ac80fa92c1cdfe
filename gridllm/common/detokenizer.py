"""Incremental detokenization with stop strings, shared by ``LLM`` and the router."""

from __future__ import annotations

import logging
import sys
from typing import Any

from gridllm.common.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Tokens before the first new one that are decoded again for context (spaces, merges).
_CONTEXT_TOKENS = 5


def _decode_stream(tokenizer: Any, context_ids: list[int], skip_special_tokens: bool
                   ) -> tuple[Any, Any] | tuple[None, None]:
    """``(DecodeStream, backend)`` where the tokenizers library can decode the stream itself
    with the same result as ``tokenizer.decode`` (a fast tokenizer that cleans up no
    spaces), else ``(None, None)``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None, None
    # Taken from the library the backend comes from, already loaded with it: the ground
    # imports no tokenizer library (the client needs none).
    library = sys.modules.get(type(backend).__module__.split(".")[0])
    stream_class = getattr(getattr(library, "decoders", None), "DecodeStream", None)
    if stream_class is None or type(backend).__name__ != "Tokenizer":  # tokenizers < 0.21
        return None, None
    return stream_class(context_ids, skip_special_tokens), backend


class IncrementalDetokenizer:
    """Turns a stream of token ids into text without splitting a multi-byte character.

    Also finds stop strings: ``update`` returns the matched string, after which
    ``output_text`` ends at (or just after, with ``include_stop_str_in_output``) it.

    A fast tokenizer decodes through the tokenizers library's ``DecodeStream`` (one call per
    token, on a window of a few tokens); others decode the window twice per token.

    Args:
        tokenizer: a transformers tokenizer, or None (then text stays empty).
        prompt_token_ids: decoded again as context for the first output tokens.
        params: skip_special_tokens, stop, include_stop_str_in_output.
    """

    def __init__(self, tokenizer: Any | None, prompt_token_ids: list[int],
                 params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.output_text = ""
        self._stream, self._backend = (
            _decode_stream(tokenizer, self.token_ids, params.skip_special_tokens)
            if tokenizer is not None else (None, None))
        self._num_emitted = 0
        self._stopped = False
        self._stops: list[str] = list(params.stop or [])
        self._max_stop_len = max((len(s) for s in self._stops), default=0)

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; returns the stop string that ended the text, if any."""
        if self.tokenizer is None:
            return None
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            delta = self._decode_next()
            if not delta:
                continue
            start = max(len(self.output_text) - self._max_stop_len + 1, 0)
            self.output_text += delta
            stop = self._find_stop(start)
            if stop is not None:
                return stop
        return None

    def _decode_next(self, is_final: bool = False) -> str:
        """Text the tokens after ``read_offset`` add; "" while a character is incomplete,
        unless ``is_final``."""
        if self._stream is not None and not is_final:
            try:
                chunk = self._stream.step(self._backend, self.token_ids[-1])
            except Exception as exc:  # noqa: BLE001 - a decoder the stream cannot follow
                logger.debug("streaming decode failed (%s); decoding windows instead", exc)
                self._stream = None
            else:
                if chunk is None:
                    return ""
                # Kept for flush(), which decodes what the stream still holds back.
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.token_ids)
                return chunk
        return self._decode_window(is_final)

    def _decode_window(self, is_final: bool) -> str:
        assert self.tokenizer is not None
        decode = self.tokenizer.decode
        skip = self.params.skip_special_tokens
        prefix_text = decode(self.token_ids[self.prefix_offset:self.read_offset],
                             skip_special_tokens=skip)
        new_text = decode(self.token_ids[self.prefix_offset:], skip_special_tokens=skip)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not is_final):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text):]

    def flush(self) -> None:
        """At the end, emit what was held back waiting for a character to complete."""
        if self.tokenizer is None or self.read_offset == len(self.token_ids) or self._stopped:
            return
        self.output_text += self._decode_next(is_final=True)

    def _find_stop(self, start: int) -> str | None:
        for stop in self._stops:
            index = self.output_text.find(stop, start)
            if index != -1:
                end = index + len(stop) if self.params.include_stop_str_in_output else index
                self.output_text = self.output_text[:end]
                self._stopped = True
                return stop
        return None

    def get_delta(self, finished: bool) -> str:
        """Text not handed out yet; holds back a tail that could begin a stop string."""
        if finished:
            self.flush()
        end = len(self.output_text)
        if not finished and self._max_stop_len > 1:
            end = max(end - self._max_stop_len + 1, self._num_emitted)
        delta = self.output_text[self._num_emitted:end]
        self._num_emitted = end
        return delta
