"""``bench serve --backend openai``: its HTTP client and event parsing against a fake
OpenAI-compatible server, with the statistics of the gRPC path."""

from __future__ import annotations

import asyncio
import json

from gridllm.bench.datasets import random_requests
from gridllm.bench.serve import ServeConfig, run_serve_async
from gridllm.common.http_server import HttpServer


class _FakeOpenAI:
    """/v1/models, and /v1/completions streaming one token per event (token id = position),
    with an empty-text event carrying no tokens now and then, as a held-back delta does."""

    def __init__(self):
        self.bodies: list[dict] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/v1/models":
            payload = {"object": "list", "data": [{"id": "fake", "max_model_len": 4096,
                                                   "vocab_size": 100, "eos_token_id": 2}]}
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(payload).encode()})
            return
        request = json.loads(body)
        self.bodies.append(request)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(request["max_tokens"]):
            await asyncio.sleep(0.001)
            for token_ids in ([i], []) if i % 2 else ([i],):
                event = {"choices": [{"index": 0, "text": "x" if token_ids else "",
                                      "token_ids": token_ids}]}
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + json.dumps(event).encode() + b"\n\n"})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def test_openai_backend_counts_tokens_as_the_grpc_one():
    async def scenario():
        fake = _FakeOpenAI()
        server = HttpServer(fake, "127.0.0.1", 0)
        port = await server.start()
        try:
            config = ServeConfig(target=f"http://127.0.0.1:{port}", num_prompts=6,
                                 input_len_range=(3, 9), output_len_range=(2, 5),
                                 request_rate=200.0, max_concurrency=2, use_tqdm=False,
                                 backend="openai")
            return fake, await run_serve_async(config)
        finally:
            await server.stop(1.0)

    fake, result = asyncio.run(asyncio.wait_for(scenario(), 60))
    requests = random_requests(6, (3, 9), (2, 5), 100, seed=0, excluded_token_ids=[2])
    assert result["num_completed"] == 6 and result["num_failed"] == 0
    assert sorted(len(b["prompt"]) for b in fake.bodies) == sorted(r.input_len for r in requests)
    assert all(b["stream"] and b["return_token_ids"] and b["model"] == "fake"
               for b in fake.bodies)
    assert result["total_output_tokens"] == sum(r.output_len for r in requests)
    assert result["itl_ms"]["p50"] >= 1.0 and result["model"] == "fake"
