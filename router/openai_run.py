"""One OpenAI completion or chat request run through the EngineClient: the whole answer, or
its server-sent events."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response
from starlette.types import Receive

from gridllm.common.completion import CompletionDelta
from router.engine_client import EngineClient, RequestFailure
from router.http_streaming import (
    DONE_EVENT,
    ClientDisconnected,
    EventStreamResponse,
    merge,
    sse_event,
    until_disconnect,
)
from router.openai_protocol import (
    ApiError,
    ParsedRequest,
    bad_request,
    failure_error,
    param_of,
)
from router.openai_responses import (
    ChoiceState,
    chat_chunk_choices,
    completion_chunk_choice,
    usage_dict,
)
from router.validation import ValidatedRequest

# What an HTTP client that left gets (nobody reads it): nginx's "client closed request".
STATUS_CLIENT_CLOSED = 499


class OpenAIRun:
    """The prompts of one request (a chat has one; a completion may batch several), each
    with ``n`` choices: choice ``i * n + k`` is completion ``k`` of prompt ``i``.

    Args:
        engine: the request path.
        parsed: the request as read from the body.
        validated: one validated request per prompt.
        model_name: the ``model`` of the answer.
        is_chat: chat completion objects, or text completions.
    """

    def __init__(self, engine: EngineClient, parsed: ParsedRequest,
                 validated: list[ValidatedRequest], model_name: str, is_chat: bool):
        self.engine = engine
        self.parsed = parsed
        self.validated = validated
        self.model_name = model_name
        self.is_chat = is_chat
        self.object = "chat.completion" if is_chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if is_chat else "text_completion"
        self.with_logprobs = parsed.num_logprobs is not None
        # vLLM's extra: the choices carry their token ids too.
        self.with_token_ids = validated[0].return_token_ids
        self.states = [ChoiceState(i, tool_mode=parsed.tool_mode, tool_name=parsed.tool_name)
                       for i in range(len(validated) * parsed.n)]
        self.created = int(time.time())

    async def _deltas(self) -> AsyncIterator[tuple[int, CompletionDelta]]:
        # One of the router's max_num_streams for as long as the request runs.
        with self.engine.stream_slot():
            async with contextlib.aclosing(merge(  # type: ignore[type-var]
                    [self.engine.generate(v, None, "http") for v in self.validated])) as items:
                async for item in items:
                    yield item

    def _echo(self, prompt_index: int) -> str:
        validated = self.validated[prompt_index]
        if validated.prompt is not None:
            return validated.prompt
        tokenizer = self.engine.tokenizer
        return "" if tokenizer is None else tokenizer.decode(validated.prompt_token_ids)

    def _usage(self) -> dict[str, Any]:
        n = self.parsed.n
        num_cached = sum(max(s.num_cached_tokens for s in self.states[i * n:(i + 1) * n])
                         for i in range(len(self.validated)))
        return usage_dict(sum(len(v.prompt_token_ids) for v in self.validated),
                          sum(s.num_tokens for s in self.states), num_cached)

    # ----------------------------------------------------------------- whole answer
    async def response(self, receive: Receive, request_id: str) -> Response:
        headers = {"X-Request-Id": request_id}
        try:
            await until_disconnect(self._collect(), receive)
        except ClientDisconnected:
            return Response(status_code=STATUS_CLIENT_CLOSED)
        except (RequestFailure, ValueError) as exc:
            raise _api_error(exc) from None
        if self.parsed.echo:
            for state in self.states:
                state.text = self._echo(state.index // self.parsed.n) + state.text
        choices = [s.chat_choice(self.with_logprobs) if self.is_chat
                   else s.completion_choice(self.with_logprobs, self.with_token_ids)
                   for s in self.states]
        body = {"id": request_id, "object": self.object, "created": self.created,
                "model": self.model_name, "choices": choices, "usage": self._usage()}
        return JSONResponse(body, headers=headers)

    async def _collect(self) -> None:
        async with contextlib.aclosing(self._deltas()) as deltas:  # type: ignore[type-var]
            async for position, delta in deltas:
                self.states[position * self.parsed.n + delta.index].add(delta)

    # ----------------------------------------------------------------- streamed
    async def stream_response(self, receive: Receive, request_id: str) -> Response:
        """The event stream; an error before the first event is an error status instead."""
        events = self._events(request_id)
        try:
            first = await until_disconnect(events.__anext__(), receive)
        except ClientDisconnected:
            return Response(status_code=STATUS_CLIENT_CLOSED)
        except (RequestFailure, ValueError) as exc:
            await events.aclose()
            raise _api_error(exc) from None
        return EventStreamResponse(_prepend(first, events), {"X-Request-Id": request_id})

    async def _events(self, request_id: str) -> AsyncIterator[bytes]:
        has_sent = False
        try:
            async with contextlib.aclosing(self._deltas()) as deltas:  # type: ignore[type-var]
                async for position, delta in deltas:
                    for choice in self._chunk_choices(position, delta):
                        chunk = {"id": request_id, "object": self.chunk_object,
                                 "created": self.created, "model": self.model_name,
                                 "choices": [choice]}
                        if self.parsed.include_usage:
                            chunk["usage"] = None
                        has_sent = True
                        yield sse_event(chunk)
        except (RequestFailure, ValueError) as exc:
            if not has_sent:
                raise
            # Headers are gone: the error travels as an event, as OpenAI's streams do.
            yield sse_event(_api_error(exc).body())
            yield DONE_EVENT
            return
        if self.parsed.include_usage:
            yield sse_event({"id": request_id, "object": self.chunk_object,
                             "created": self.created, "model": self.model_name,
                             "choices": [], "usage": self._usage()})
        yield DONE_EVENT

    def _chunk_choices(self, position: int, delta: CompletionDelta) -> list[dict[str, Any]]:
        state = self.states[position * self.parsed.n + delta.index]
        if self.is_chat:
            choices = chat_chunk_choices(state, delta, self.with_logprobs)
        else:
            text = delta.text
            if self.parsed.echo and not state.has_sent_role:
                state.has_sent_role = True  # the echo goes out once, first
                text = self._echo(position) + text
            choices = []
            if text or delta.finished or (self.with_logprobs and delta.new_logprobs) or (
                    self.with_token_ids and delta.new_token_ids):
                choices = [completion_chunk_choice(state, delta, text, self.with_logprobs,
                                                   self.with_token_ids)]
        state.add(delta)
        return choices


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(rest):  # type: ignore[type-var]
        yield first
        async for item in rest:
            yield item


def _api_error(exc: Exception) -> ApiError:
    if isinstance(exc, RequestFailure):
        return failure_error(exc)
    return bad_request(str(exc), param_of(str(exc)))
