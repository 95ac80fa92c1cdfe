"""gridllm.common.tracing: spans per request, and the context carried in gRPC metadata."""

from __future__ import annotations

import pytest

from gridllm.common import tracing

sdk = pytest.importorskip("opentelemetry.sdk.trace")
exporter_module = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")


def test_the_callee_span_joins_the_caller_trace_through_metadata(monkeypatch):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    exporter = exporter_module.InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    with tracing.span("router.generate", "req-1"):
        metadata = (("x-request-id", "req-1"), *tracing.grpc_metadata())
    assert any(key == "traceparent" for key, _ in metadata)
    with pytest.raises(ValueError), tracing.span("scheduler.submit", "req-1", metadata):
        raise ValueError("bad")
    router, scheduler = sorted(exporter.get_finished_spans(), key=lambda s: s.name)
    assert scheduler.context.trace_id == router.context.trace_id
    assert scheduler.parent.span_id == router.context.span_id
    assert router.attributes["gridllm.request_id"] == "req-1"
    assert scheduler.status.status_code.name == "ERROR"
    assert tracing.grpc_metadata() == ()  # no span open any more


def test_without_a_tracer_spans_are_no_ops(monkeypatch):
    monkeypatch.setattr(tracing, "trace", None)
    monkeypatch.setattr(tracing, "_tracer", None)
    with tracing.span("router.generate", "req-1") as span:
        assert span is None and tracing.grpc_metadata() == ()
