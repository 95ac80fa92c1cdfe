"""gridllm.common.logger: JSON lines, the request id on every line logged for a request."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from gridllm.common.logger import (
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    log_format_from_env,
    request_id_var,
)


def _logger(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    log = logging.getLogger(f"test-logger-{id(stream)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    return log, stream


def test_json_lines_carry_the_request_id_of_their_task_and_extra_fields():
    log, stream = _logger(JsonFormatter())

    async def handle(request_id: str) -> None:
        request_id_var.set(request_id)
        await asyncio.sleep(0)
        log.info("working on it %d", 7, extra={"prompt_tokens": 12})

    async def main() -> None:
        await asyncio.gather(handle("a"), handle("b"))
        log.info("no request")
        log.info("about one", extra={"request_id": "c"})

    asyncio.run(main())
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["message"], e["request_id"]) for e in lines] == [
        ("working on it 7", "a"), ("working on it 7", "b"), ("no request", None),
        ("about one", "c")]
    assert lines[0]["prompt_tokens"] == 12 and lines[0]["level"] == "INFO"
    assert lines[0]["logger"].startswith("test-logger-") and "T" in lines[0]["time"]


def test_json_lines_hold_the_traceback_and_text_lines_the_request_id():
    log, stream = _logger(JsonFormatter())
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    (entry,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert "RuntimeError: boom" in entry["exception"]
    log, stream = _logger(TextFormatter())
    token = request_id_var.set("req-1")
    try:
        log.info("hello")
    finally:
        request_id_var.reset(token)
    log.info("plain")
    first, second = stream.getvalue().splitlines()
    assert first.endswith("hello request_id=req-1") and second.endswith("plain")


def test_log_format_is_checked(monkeypatch):
    monkeypatch.setenv("GRIDLLM_LOG_FORMAT", "JSON")
    assert log_format_from_env() == "json"
    assert log_format_from_env("text") == "text"
    monkeypatch.setenv("GRIDLLM_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="GRIDLLM_LOG_FORMAT must be one of text, json"):
        log_format_from_env()
