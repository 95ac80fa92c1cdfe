"""Logging set-up (text or JSON lines), the request id of log lines, and the function-call
trace (GRIDLLM_TRACE_FUNCTION=1).

Every line logged while a request is handled carries its id: the services set
``request_id_var`` (a context variable, so each request's asyncio task has its own) and a
filter copies it onto the record, where both formats print it. A line about one request
logged elsewhere passes ``extra={"request_id": ...}``.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import sys
from types import FrameType
from typing import Any

_ENGINE_PACKAGES = ("gridllm", "scheduler_svc", "worker_svc", "kernels", "router")
LOG_FORMATS = ("text", "json")
_configured = False
logger = logging.getLogger(__name__)

# The id of the request the current task works on (None: no request).
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gridllm_request_id", default=None)
# Attributes every LogRecord has: anything else on a record came from ``extra``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on each record (unless ``extra`` set one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    """``time level logger: message``, then ``request_id=...`` when the line is about one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return text if request_id is None else f"{text} request_id={request_id}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, the fields passed
    in ``extra`` and, after an exception, its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def log_format_from_env(log_format: str | None = None) -> str:
    """``log_format``, else ``GRIDLLM_LOG_FORMAT``, else ``text`` (ValueError naming the
    source for anything but text or json)."""
    source = "--log-format" if log_format is not None else "GRIDLLM_LOG_FORMAT"
    value = (log_format if log_format is not None
             else os.environ.get("GRIDLLM_LOG_FORMAT", "text")).lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"{source} must be one of {', '.join(LOG_FORMATS)}, got {value!r}.")
    return value


def configure_logging(level: str | None = None, log_format: str | None = None) -> None:
    """Configure the root logger once, from ``level`` or ``GRIDLLM_LOGGING_LEVEL`` and
    ``log_format`` (``text`` or ``json``) or ``GRIDLLM_LOG_FORMAT``."""
    global _configured
    if _configured:
        return
    _configured = True
    level = (level or os.environ.get("GRIDLLM_LOGGING_LEVEL", "INFO")).upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"GRIDLLM_LOGGING_LEVEL must be a logging level name, got {level!r}.")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format_from_env(log_format) == "json"
                         else TextFormatter())
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=level, handlers=[handler])
    for name in _ENGINE_PACKAGES:
        logging.getLogger(name).setLevel(level)
    if os.environ.get("GRIDLLM_TRACE_FUNCTION") == "1":
        enable_function_trace()


def _trace_calls(frame: FrameType, event: str, arg: Any) -> None:
    if event != "call":
        return
    module = frame.f_globals.get("__name__", "")
    if module.split(".", 1)[0] in _ENGINE_PACKAGES and module != __name__:
        logging.getLogger("gridllm.trace").debug(
            "call %s.%s (%s:%d)", module, frame.f_code.co_name, frame.f_code.co_filename,
            frame.f_lineno)


def enable_function_trace() -> None:
    """Log every call of the engine's own functions (GRIDLLM_TRACE_FUNCTION=1); slow."""
    logging.getLogger("gridllm.trace").setLevel(logging.DEBUG)
    sys.setprofile(_trace_calls)
    import threading

    threading.setprofile(_trace_calls)
