"""Python clients of the public API (``gridllm.v1.Generation``): ``Client`` and ``AsyncClient``.

    from gridllm import Client, SamplingParams
    with Client("localhost:50051") as client:
        for chunk in client.generate_stream("Hello", SamplingParams(max_tokens=32)):
            print(chunk.text, end="", flush=True)
        output = client.generate("Hello")            # the whole completion at once
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from gridllm.common.auth import API_KEY_ENV, bearer_metadata
from gridllm.common.completion import Usage
from gridllm.common.convert import sampling_params_to_pb
from gridllm.common.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import generate_pb2, generate_pb2_grpc

_FINISH_REASONS = {
    generate_pb2.FINISH_REASON_UNSPECIFIED: None,
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_LENGTH: "length",
    generate_pb2.FINISH_REASON_ABORT: "abort",
}
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]


@dataclass
class GenerateChunk:
    """One streamed piece of a completion."""

    request_id: str
    # Which of the n completions it belongs to.
    index: int
    # Text added since the previous chunk of this completion.
    text: str
    # Token ids added (when return_token_ids=True).
    token_ids: list[int] = field(default_factory=list)
    # One entry per token id (when SamplingParams.logprobs is set).
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    # "stop" | "length" | "abort" on the last chunk of a completion, else None.
    finish_reason: str | None = None
    # The stop string or stop token id that ended it.
    stop_reason: str | int | None = None
    usage: Usage | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerateOutput(RequestOutput):
    """What ``generate`` returns: a ``RequestOutput`` (as ``LLM.generate`` gives) plus the
    usage the stream reported: prompt tokens, completion tokens of every completion together,
    and prompt tokens served from the prefix cache."""

    usage: Usage | None = None


@dataclass
class ModelInfo:
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_id: int | None
    block_size: int


@dataclass
class WorkerStats:
    worker_id: str
    kv_blocks_total: int
    kv_blocks_free: int
    address: str = ""
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    is_alive: bool = True


@dataclass
class ServerStats:
    num_requests_running: int
    num_requests_waiting: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    workers: list[WorkerStats]
    num_workers_alive: int = 0
    num_preemptions: int = 0
    num_schedulers: int = 0


# ----------------------------------------------------------------------- conversions
def build_generate_request(prompt: str | None = None,
                           sampling_params: SamplingParams | None = None, *,
                           prompt_token_ids: list[int] | None = None,
                           messages: list[dict[str, str]] | None = None,
                           request_id: str | None = None, priority: int = 0,
                           return_token_ids: bool = False,
                           add_special_tokens: bool | None = None
                           ) -> generate_pb2.GenerateRequest:
    """A GenerateRequest from exactly one of ``prompt``, ``prompt_token_ids``, ``messages``."""
    given = [x is not None for x in (prompt, prompt_token_ids, messages)]
    if sum(given) != 1:
        raise ValueError("pass exactly one of prompt, prompt_token_ids or messages.")
    request = generate_pb2.GenerateRequest(priority=priority, return_token_ids=return_token_ids)
    if request_id is not None:
        request.request_id = request_id
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    if prompt is not None:
        request.prompt = prompt
    elif prompt_token_ids is not None:
        request.prompt_token_ids.ids.extend(prompt_token_ids)
    else:
        request.chat.CopyFrom(_chat_to_pb(messages or []))
    if sampling_params is not None:
        request.sampling_params.CopyFrom(sampling_params_to_pb(sampling_params))
    return request


def _chat_to_pb(messages: list[dict[str, str]]) -> generate_pb2.ChatMessages:
    chat = generate_pb2.ChatMessages()
    for message in messages:
        chat.messages.add(role=message["role"], content=message["content"])
    return chat


def _logprobs_from_pb(items) -> list[PositionLogprobs]:
    positions = []
    for item in items:
        tokens = list(item.tokens) or [None] * len(item.token_ids)
        position: PositionLogprobs = {}
        for token_id, logprob, rank, text in zip(item.token_ids, item.logprobs, item.ranks,
                                                 tokens, strict=True):
            position.setdefault(token_id, Logprob(logprob, rank, text or None))
        positions.append(position)
    return positions


def chunk_from_pb(msg: generate_pb2.GenerateResponse) -> GenerateChunk:
    finish = _FINISH_REASONS[msg.finish_reason]
    stop_kind = msg.WhichOneof("stop_reason")
    return GenerateChunk(
        msg.request_id, msg.index, msg.text, list(msg.token_ids),
        _logprobs_from_pb(msg.logprobs), finish,
        getattr(msg, stop_kind) if stop_kind else None,
        Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens)
        if msg.HasField("usage") else None)


class _Collector:
    """Accumulates chunks into a RequestOutput (the non-streaming result)."""

    def __init__(self, prompt: str | None, prompt_token_ids: list[int] | None):
        self.output = GenerateOutput("", prompt, list(prompt_token_ids or []), None)
        self._completions: dict[int, CompletionOutput] = {}

    def add(self, chunk: GenerateChunk) -> None:
        self.output.request_id = chunk.request_id
        completion = self._completions.setdefault(
            chunk.index, CompletionOutput(chunk.index, "", [], None, None))
        completion.text += chunk.text
        completion.token_ids.extend(chunk.token_ids)
        if chunk.logprobs:
            completion.logprobs = (completion.logprobs or []) + chunk.logprobs
        if chunk.finish_reason is not None:
            completion.finish_reason = chunk.finish_reason
            completion.stop_reason = chunk.stop_reason
        if chunk.usage is not None:
            self.output.num_cached_tokens = max(self.output.num_cached_tokens,
                                                chunk.usage.cached_tokens)
            usage = self.output.usage or Usage(chunk.usage.prompt_tokens, 0, 0)
            self.output.usage = Usage(
                usage.prompt_tokens, usage.completion_tokens + chunk.usage.completion_tokens,
                max(usage.cached_tokens, chunk.usage.cached_tokens))

    def result(self) -> GenerateOutput:
        self.output.outputs = [self._completions[i] for i in sorted(self._completions)]
        self.output.finished = all(c.finished for c in self.output.outputs)
        return self.output


def _model_info(msg: generate_pb2.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(msg.model, msg.max_model_len, msg.vocab_size,
                     msg.eos_token_id if msg.HasField("eos_token_id") else None, msg.block_size)


def _server_stats(msg: generate_pb2.GetServerStatsResponse) -> ServerStats:
    workers = [WorkerStats(w.worker_id, w.kv_blocks_total, w.kv_blocks_free, w.address,
                           w.num_requests_running, w.num_requests_waiting, w.is_alive)
               for w in msg.workers]
    return ServerStats(msg.num_requests_running, msg.num_requests_waiting,
                       msg.prefix_cache_queries, msg.prefix_cache_hits, workers,
                       msg.num_workers_alive, msg.num_preemptions, msg.num_schedulers)


def _tokenize_request(text: str | None, messages: list[dict[str, str]] | None,
                      add_special_tokens: bool | None) -> generate_pb2.TokenizeRequest:
    if (text is None) == (messages is None):
        raise ValueError("pass exactly one of text or messages.")
    request = generate_pb2.TokenizeRequest()
    if text is not None:
        request.text = text
    else:
        request.chat.CopyFrom(_chat_to_pb(messages or []))
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    return request


# ----------------------------------------------------------------------- TLS
def _channel(target: str, is_async: bool, tls: bool | None, tls_ca: str | None,
             tls_cert: str | None, tls_key: str | None, tls_server_name: str | None) -> Any:
    """A plaintext channel, or a TLS one when ``tls`` (None: when ``tls_ca`` or
    ``tls_cert`` is given): the router's certificate checked against ``tls_ca`` (None: the
    system's roots), ``tls_cert``/``tls_key`` presented when the router asks for them."""
    module = grpc.aio if is_async else grpc
    if tls is None:
        tls = tls_ca is not None or tls_cert is not None
    if not tls:
        return module.insecure_channel(target, options=_CHANNEL_OPTIONS)
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key must be given together.")

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
    options = list(_CHANNEL_OPTIONS)
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return module.secure_channel(target, credentials, options=options)


def _auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return bearer_metadata(api_key if api_key is not None else os.environ.get(API_KEY_ENV))


# ----------------------------------------------------------------------- clients
class Client:
    """Blocking client of a gridllm router.

    Args:
        target: ``host:port`` of the router.
        timeout: default deadline of every call, in seconds (None: none).
        tls: dial with TLS (None: when ``tls_ca`` or ``tls_cert`` is given).
        tls_ca: CA certificate (PEM file) the router's certificate must chain to (None
            with ``tls``: the system's roots); ``gridllm up --tls`` prints its path.
        tls_cert, tls_key: a client certificate and its key (PEM files), for a router that
            asks for one.
        tls_server_name: the name checked in the router's certificate (default: the host
            in ``target``).
        api_key: sent as ``authorization: Bearer KEY`` on every call (None:
            ``$GRIDLLM_API_KEY`` if set, else no key).
    Errors are ``grpc.RpcError`` (e.g. ``INVALID_ARGUMENT`` naming the bad field,
    ``UNAUTHENTICATED`` without a valid key).
    """

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = None,
                 tls: bool | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls_server_name: str | None = None, api_key: str | None = None):
        self.target = target
        self.timeout = timeout
        self._metadata = _auth_metadata(api_key)
        self._channel = _channel(target, False, tls, tls_ca, tls_cert, tls_key,
                                 tls_server_name)
        self._stub = generate_pb2_grpc.GenerationStub(self._channel)

    def generate_stream(self, prompt: str | None = None,
                        sampling_params: SamplingParams | None = None, *,
                        timeout: float | None = None, **kwargs: Any) -> Iterator[GenerateChunk]:
        """Stream a completion chunk by chunk.

        Args:
            prompt: text (or pass ``prompt_token_ids=[...]`` or ``messages=[...]``).
            sampling_params: how to sample (server defaults if None).
            timeout: deadline in seconds for the whole stream.
            **kwargs: request_id, priority, return_token_ids, add_special_tokens,
                prompt_token_ids, messages.
        Returns:
            An iterator of GenerateChunk; closing it early cancels the request.
        """
        request = build_generate_request(prompt, sampling_params, **kwargs)
        call = self._stub.Generate(request, timeout=timeout or self.timeout,
                                   metadata=self._metadata)
        try:
            for msg in call:
                yield chunk_from_pb(msg)
        finally:
            call.cancel()  # no-op once the stream ended; aborts it if the caller stopped early

    def generate(self, prompt: str | None = None, sampling_params: SamplingParams | None = None,
                 *, timeout: float | None = None, **kwargs: Any) -> GenerateOutput:
        """The whole completion(s) of one prompt, as ``LLM.generate`` returns them, with
        ``usage`` (summed over the n completions)."""
        collector = _Collector(prompt, kwargs.get("prompt_token_ids"))
        for chunk in self.generate_stream(prompt, sampling_params, timeout=timeout, **kwargs):
            collector.add(chunk)
        return collector.result()

    def tokenize(self, text: str | None = None, *, messages: list[dict[str, str]] | None = None,
                 add_special_tokens: bool | None = None) -> list[int]:
        reply = self._stub.Tokenize(_tokenize_request(text, messages, add_special_tokens),
                                    timeout=self.timeout, metadata=self._metadata)
        return list(reply.token_ids)

    def model_info(self) -> ModelInfo:
        return _model_info(self._stub.GetModelInfo(
            generate_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata))

    def server_stats(self) -> ServerStats:
        return _server_stats(self._stub.GetServerStats(
            generate_pb2.GetServerStatsRequest(), timeout=self.timeout, metadata=self._metadata))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client of a gridllm router (``grpc.aio``); same methods as ``Client``.

    Args:
        target: ``host:port`` of the router.
        timeout: default deadline of every call, in seconds (None: none).
        tls, tls_ca, tls_cert, tls_key, tls_server_name, api_key: as for ``Client``.
    """

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = None,
                 tls: bool | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls_server_name: str | None = None, api_key: str | None = None):
        self.target = target
        self.timeout = timeout
        self._metadata = _auth_metadata(api_key)
        self._channel = _channel(target, True, tls, tls_ca, tls_cert, tls_key,
                                 tls_server_name)
        self._stub = generate_pb2_grpc.GenerationStub(self._channel)

    async def generate_stream(self, prompt: str | None = None,
                              sampling_params: SamplingParams | None = None, *,
                              timeout: float | None = None,
                              **kwargs: Any) -> AsyncIterator[GenerateChunk]:
        """Stream a completion; breaking out of the loop (or cancelling) aborts it."""
        request = build_generate_request(prompt, sampling_params, **kwargs)
        call = self._stub.Generate(request, timeout=timeout or self.timeout,
                                   metadata=self._metadata)
        try:
            async for msg in call:
                yield chunk_from_pb(msg)
        finally:
            call.cancel()

    async def generate(self, prompt: str | None = None,
                       sampling_params: SamplingParams | None = None, *,
                       timeout: float | None = None, **kwargs: Any) -> GenerateOutput:
        collector = _Collector(prompt, kwargs.get("prompt_token_ids"))
        async for chunk in self.generate_stream(prompt, sampling_params, timeout=timeout,
                                                **kwargs):
            collector.add(chunk)
        return collector.result()

    async def tokenize(self, text: str | None = None, *,
                       messages: list[dict[str, str]] | None = None,
                       add_special_tokens: bool | None = None) -> list[int]:
        reply = await self._stub.Tokenize(_tokenize_request(text, messages, add_special_tokens),
                                          timeout=self.timeout, metadata=self._metadata)
        return list(reply.token_ids)

    async def model_info(self) -> ModelInfo:
        return _model_info(await self._stub.GetModelInfo(
            generate_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata))

    async def server_stats(self) -> ServerStats:
        return _server_stats(await self._stub.GetServerStats(
            generate_pb2.GetServerStatsRequest(), timeout=self.timeout, metadata=self._metadata))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
