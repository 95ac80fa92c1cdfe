"""Optional OpenTelemetry tracing: a span per request in the router and in the scheduler.

With the ``opentelemetry`` extra installed (``pip install gridllm[opentelemetry]``) and
``OTEL_EXPORTER_OTLP_ENDPOINT`` set, each service exports its spans over OTLP; the router's
span context travels to the scheduler in the Submit call's metadata (W3C ``traceparent``), so
both spans share one trace. Without the API installed, or with no SDK configured, every call
here is a cheap no-op. Spans are started explicitly (never made "current"), since a request's
span outlives the steps of an async generator.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

logger = logging.getLogger(__name__)

try:
    from opentelemetry import propagate, trace
except ImportError:  # the extra is not installed
    propagate = trace = None  # type: ignore[assignment]

_tracer: Any = None
# The request span the current task is in (set by ``span``; read by ``grpc_metadata``).
_current_span: contextvars.ContextVar[Any] = contextvars.ContextVar("gridllm_span",
                                                                     default=None)


def configure_tracing(service_name: str) -> bool:
    """Export spans over OTLP when the SDK and exporter are installed and
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set. Returns whether spans are exported."""
    global _tracer
    if trace is None or not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK or OTLP "
                       "exporter is missing: pip install gridllm[opentelemetry]")
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = None
    logger.info("exporting OpenTelemetry spans to %s", os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])
    return True


def _get_tracer() -> Any:
    global _tracer
    if _tracer is None and trace is not None:
        _tracer = trace.get_tracer("gridllm")
    return _tracer


def reset() -> None:
    """Forget the cached tracer (after a test installed a provider)."""
    global _tracer
    _tracer = None


@contextlib.contextmanager
def span(name: str, request_id: str, metadata: Sequence[tuple[str, Any]] | None = None
         ) -> Iterator[Any]:
    """A span for one request, ended when the block exits (an exception marks it failed).

    Args:
        name: e.g. ``router.generate``.
        request_id: recorded as ``gridllm.request_id``.
        metadata: gRPC invocation metadata carrying the caller's span context, if any.
    Yields:
        The span (None without OpenTelemetry).
    """
    tracer = _get_tracer()
    if tracer is None:
        yield None
        return
    parent = None
    if metadata:
        parent = propagate.extract({k: v for k, v in metadata if isinstance(v, str)})
    current = tracer.start_span(name, context=parent,
                                attributes={"gridllm.request_id": request_id})
    token = _current_span.set(current)
    try:
        yield current
    except BaseException as exc:
        current.record_exception(exc)
        current.set_status(trace.Status(trace.StatusCode.ERROR, str(exc) or type(exc).__name__))
        raise
    finally:
        current.end()
        with contextlib.suppress(ValueError):  # finalised in another context
            _current_span.reset(token)


def grpc_metadata() -> tuple[tuple[str, str], ...]:
    """The open span's context as gRPC metadata (``traceparent``...), empty when none."""
    current = _current_span.get()
    if current is None or propagate is None:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(current))
    return tuple(carrier.items())
