"""Logging set-up and the function-call trace (GRIDLLM_TRACE_FUNCTION=1)."""

from __future__ import annotations

import logging
import os
import sys
from types import FrameType
from typing import Any

_ENGINE_PACKAGES = ("gridllm", "scheduler_svc", "worker_svc", "kernels", "router")
_configured = False
logger = logging.getLogger(__name__)


def configure_logging(level: str | None = None) -> None:
    """Configure the root logger once, from ``level`` or ``GRIDLLM_LOGGING_LEVEL``."""
    global _configured
    if _configured:
        return
    _configured = True
    level = (level or os.environ.get("GRIDLLM_LOGGING_LEVEL", "INFO")).upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"GRIDLLM_LOGGING_LEVEL must be a logging level name, got {level!r}.")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
