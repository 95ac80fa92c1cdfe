"""The router's HTTP front: the OpenAI-compatible API, ``/metrics``, ``/health``, ``/ready``.

Served by uvicorn in the router's own event loop, next to the gRPC server, through the same
request path (``EngineClient``): ``POST /v1/completions``, ``POST /v1/chat/completions``
(streamed as server-sent events ending with ``data: [DONE]``), ``GET /v1/models``,
``POST /tokenize``, ``POST /detokenize``. Errors are OpenAI error objects: 400 naming the
field, 404 for an unknown model, 429 when the scheduler's queue is full (with its
``Retry-After``), 503 when no scheduler can serve.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gridllm.common.logger import request_id_var
from router.auth import RouterAuth
from router.engine_client import DEFAULT_MAX_REQUEST_BYTES, EngineClient, RequestFailure
from router.metrics import RouterMetrics
from router.openai_protocol import (
    ApiError,
    ParsedRequest,
    bad_request,
    chat_messages,
    failure_error,
    param_of,
    parse_chat,
    parse_completion,
)
from router.openai_run import OpenAIRun
from router.request_log import access_logger
from router.validation import ValidatedRequest, render_chat, tokenize_text

logger = logging.getLogger(__name__)

_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize",
           "/detokenize", "/metrics", "/health", "/ready")
# A client-chosen id (X-Request-Id) is checked like a gRPC request_id.
REQUEST_ID_HEADER = "x-request-id"


def error_response(error: ApiError, request_id: str | None = None) -> JSONResponse:
    headers = dict(error.headers)
    if request_id:
        headers["X-Request-Id"] = request_id
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class HttpApi:
    """The FastAPI app over an EngineClient.

    Args:
        engine: the request path shared with the gRPC front.
        model_name: what ``/v1/models`` lists and responses name.
        accepted_models: other names a request's ``model`` may give (the model's path).
        metrics: the router's metrics, served at ``/metrics``.
        is_ready: readiness (a scheduler with a live worker can serve).
        auth: the API-key check (None: none).
        max_request_bytes: the largest request body read; a larger one gets 413 before
            it is read (its declared length), or as soon as it passes the limit (chunked).
    """

    def __init__(self, engine: EngineClient, model_name: str, accepted_models: list[str],
                 metrics: RouterMetrics, is_ready: Callable[[], bool],
                 auth: RouterAuth | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.engine = engine
        self.max_request_bytes = max_request_bytes
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.accepted_models = {model_name, *accepted_models}
        self.metrics = metrics
        self.is_ready = is_ready
        self.auth = auth
        self.created = int(time.time())
        self.app = FastAPI(title="gridllm", docs_url=None, redoc_url=None, openapi_url=None)
        self._add_routes()

    def asgi(self) -> Any:
        """The app behind the API-key check (when keys are set), counting answers per route
        and status in ``gridllm:http_requests`` (401s too)."""
        app = self.app if self.auth is None else self.auth.http(self.app)
        counter = self.metrics.http_requests

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            route = scope["path"] if scope["path"] in _ROUTES else "other"

            async def send_counted(message):
                if message["type"] == "http.response.start":
                    counter.labels(route, str(message["status"])).inc()
                await send(message)
            await app(scope, receive, send_counted)
        return counted

    def _add_routes(self) -> None:
        app = self.app
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/tokenize", self.tokenize, methods=["POST"])
        app.add_api_route("/detokenize", self.detokenize, methods=["POST"])
        app.add_api_route("/metrics", self.prometheus, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/ready", self.ready, methods=["GET"])

    # ----------------------------------------------------------------- generation
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "cmpl", parse_completion, is_chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chatcmpl", parse_chat, is_chat=True)

    async def _generate(self, request: Request, prefix: str,
                        parse: Callable[[dict, str], ParsedRequest], is_chat: bool) -> Response:
        request_id = request.headers.get(REQUEST_ID_HEADER) or f"{prefix}-{uuid.uuid4().hex}"
        token = request_id_var.set(request_id)
        try:
            body = await self._json_body(request)
            self._check_model(body)
            parsed = parse(body, request_id)
            validated = await self._validate(parsed)
            run = OpenAIRun(self.engine, parsed, validated, self.model_name, is_chat)
            if parsed.stream:
                return await run.stream_response(request.receive, request_id)
            return await run.response(request.receive, request_id)
        except ApiError as error:
            access_logger.info("http request rejected: status=%d %s", error.status,
                               error.message, extra={"status": error.status,
                                                     "protocol": "http", "param": error.param})
            return error_response(error, request_id)
        finally:
            request_id_var.reset(token)

    async def _validate(self, parsed: ParsedRequest) -> list[ValidatedRequest]:
        validated = []
        for pb in parsed.requests:
            try:
                validated.append(await self.engine.validate(pb))
            except RequestFailure as failure:
                raise failure_error(failure) from None
            except ValueError as exc:
                raise bad_request(str(exc), param_of(str(exc))) from None
        return validated

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad_request(f"model must be a string, got {type(model).__name__}.", "model")
        if model is not None and model not in self.accepted_models:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                           f"`{self.model_name}`.", "model", "invalid_request_error",
                           "model_not_found")

    # ----------------------------------------------------------------- small endpoints
    async def models(self) -> dict[str, Any]:
        card: dict[str, Any] = {"id": self.model_name, "object": "model",
                                "created": self.created, "owned_by": "gridllm"}
        info = self.engine.pool.any_info()
        if info is not None:
            # vLLM's extra, and gridllm's (what a client needs to make token-id prompts).
            card["max_model_len"] = info.max_model_len
            card["vocab_size"] = info.vocab_size
            eos = self.engine.eos_token_ids
            card["eos_token_id"] = eos[0] if eos else None
        return {"object": "list", "data": [card]}

    async def tokenize(self, request: Request) -> Response:
        try:
            body = await self._json_body(request)
            self._check_model(body)
            add_special = body.get("add_special_tokens")
            # A text no prompt of the context could hold is refused before it is tokenized
            # (where the context is known: a scheduler has answered).
            info = self.engine.pool.any_info()
            max_model_len = info.max_model_len if info is not None else None
            if "messages" in body:
                chat = chat_messages(body["messages"])
                chat.add_generation_prompt = bool(body.get("add_generation_prompt", True))
                ids = await self.engine.off_loop(
                    lambda tokenizer: render_chat(tokenizer, chat, "chat", max_model_len))
            elif isinstance(body.get("prompt"), str):
                special = True if add_special is None else bool(add_special)
                ids = await self.engine.off_loop(lambda tokenizer: tokenize_text(
                    tokenizer, body["prompt"], special, "prompt", max_model_len))
            else:
                raise bad_request("prompt must be a string (or give messages).", "prompt")
            answer: dict[str, Any] = {"count": len(ids), "tokens": ids}
            if max_model_len is not None:
                answer["max_model_len"] = max_model_len
            return JSONResponse(answer)
        except ValueError as exc:
            return error_response(bad_request(str(exc), param_of(str(exc))))
        except ApiError as error:
            return error_response(error)

    async def detokenize(self, request: Request) -> Response:
        try:
            body = await self._json_body(request)
            self._check_model(body)
            tokens = body.get("tokens")
            if not isinstance(tokens, list):
                raise bad_request("tokens must be a list of token ids.", "tokens")
            # No sequence of the context is longer (checked before the ids are walked).
            info = self.engine.pool.any_info()
            if info is not None and len(tokens) > info.max_model_len:
                raise bad_request(f"tokens has {len(tokens)} ids; max_model_len is "
                                  f"{info.max_model_len}.", "tokens")
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                       for t in tokens):
                raise bad_request("tokens must be a list of token ids.", "tokens")
            if self.tokenizer is None:
                raise bad_request("tokens: the served model has no tokenizer.", "tokens")
            vocab = len(self.tokenizer)
            if any(t >= vocab for t in tokens):
                raise bad_request(f"tokens must be token ids in [0, {vocab}).", "tokens")
            # Off the event loop, as tokenizing is: a long decode holds the interpreter.
            text = await self.engine.off_loop(lambda tokenizer: tokenizer.decode(tokens))
            return JSONResponse({"prompt": text})
        except ApiError as error:
            return error_response(error)

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(self) -> dict[str, str]:
        """Liveness: the router's event loop answers."""
        return {"status": "ok"}

    async def ready(self) -> Response:
        """Readiness: a scheduler with a live worker can take requests."""
        if self.is_ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready",
                             "reason": "no scheduler with a live worker answers"},
                            status_code=503)

    async def _json_body(self, request: Request) -> dict:
        """The request's JSON object, read up to ``max_request_bytes`` (ApiError 413
        past it, 400 for anything but a JSON object)."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise _too_large(None, limit)
        return _parse_json_object(bytes(raw))


def _too_large(size: int | None, limit: int) -> ApiError:
    has = f"has {size} bytes" if size is not None else f"has more than {limit} bytes"
    return ApiError(413, f"the request body {has}; this server reads at most {limit} (the "
                    "router's max_request_bytes).", None, "invalid_request_error",
                    "request_too_large")


def _parse_json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body must be JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object.")
    return body
