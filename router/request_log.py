"""One request's timings: the router's metrics and its access-log line.

``RequestRecord`` sees every ``CompletionDelta`` the router streams for a request; when the
request ends (finished, failed or cancelled) it feeds ``RouterMetrics`` and writes one line
to the ``router.access`` logger: request id, protocol, status, token counts, TTFT, total
time and finish reasons. With ``--log-format json`` the fields are JSON keys.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from gridllm.common.completion import CompletionDelta
from router.metrics import RouterMetrics

access_logger = logging.getLogger("router.access")


@dataclass
class _Completion:
    num_tokens: int = 0
    last_token_time: float | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0


class RequestRecord:
    """Timings and counts of one request's completions.

    Args:
        request_id: the request's id (also in every log line about it).
        num_prompt_tokens: the prompt's length.
        num_completions: the request's ``n``.
        protocol: ``grpc`` or ``http`` (the access log says which front served it).
        metrics: where the observations go (None: only the access log).
        tenant: the tenant of the request's API key ("" without keys).
    """

    def __init__(self, request_id: str, num_prompt_tokens: int, num_completions: int,
                 protocol: str, metrics: RouterMetrics | None, tenant: str = ""):
        self.request_id = request_id
        self.tenant = tenant
        self.num_prompt_tokens = num_prompt_tokens
        self.protocol = protocol
        self.metrics = metrics
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.completions = {index: _Completion() for index in range(num_completions)}
        if metrics is not None:
            metrics.requests_in_flight.inc()

    def on_delta(self, delta: CompletionDelta) -> None:
        """Note the tokens ``delta`` brought (called as it is streamed)."""
        completion = self.completions[delta.index]
        num_new = len(delta.new_token_ids)
        if num_new:
            now = time.perf_counter()
            metrics = self.metrics
            if completion.last_token_time is None:
                if self.first_token_time is None:
                    self.first_token_time = now
                if metrics is not None:
                    metrics.time_to_first_token.observe(now - self.arrival_time)
                gaps = num_new - 1
                gap = 0.0
            else:
                gaps = num_new
                gap = (now - completion.last_token_time) / num_new
            if metrics is not None and gaps:
                metrics.inter_token_latency.observe(gap, gaps)
            completion.num_tokens += num_new
            completion.last_token_time = now
        if delta.finished:
            completion.finish_reason = delta.finish_reason.value  # type: ignore[union-attr]
            if delta.usage is not None:
                completion.num_cached_tokens = delta.usage.cached_tokens

    def finish(self, status: str, code: str = "OK") -> None:
        """The request ended with ``status`` (an HTTP status or a gRPC code name, as the
        front answered) and gRPC ``code`` (``OK``, ``CANCELLED``, ``UNAVAILABLE``...)."""
        end = time.perf_counter()
        metrics = self.metrics
        if metrics is not None:
            metrics.requests_in_flight.dec()
            metrics.tenant_requests.labels(self.tenant, code).inc()
            metrics.tenant_generation_tokens.labels(self.tenant).inc(
                sum(c.num_tokens for c in self.completions.values()))
            if code not in ("OK", "CANCELLED"):
                metrics.request_failure.labels(code).inc()
            for completion in self.completions.values():
                reason = completion.finish_reason
                if reason is None and code != "CANCELLED":
                    continue  # failed: counted above
                metrics.request_success.labels(reason or "abort").inc()
                metrics.prompt_tokens.inc(self.num_prompt_tokens)
                metrics.generation_tokens.inc(completion.num_tokens)
                metrics.request_prompt_tokens.observe(self.num_prompt_tokens)
                metrics.request_generation_tokens.observe(completion.num_tokens)
                metrics.e2e_request_latency.observe(end - self.arrival_time)
        ttft_ms = (None if self.first_token_time is None
                   else round((self.first_token_time - self.arrival_time) * 1000, 3))
        fields = {
            "request_id": self.request_id, "tenant": self.tenant, "protocol": self.protocol,
            "status": status,
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": sum(c.num_tokens for c in self.completions.values()),
            "cached_tokens": max((c.num_cached_tokens for c in self.completions.values()),
                                 default=0),
            "ttft_ms": ttft_ms, "total_ms": round((end - self.arrival_time) * 1000, 3),
            "finish_reason": ",".join(c.finish_reason or "abort"
                                      for _, c in sorted(self.completions.items())) or None,
        }
        # The request id follows the message (text) or is a key (JSON), as on every line.
        access_logger.info(
            "%s request done: tenant=%s status=%s prompt_tokens=%d completion_tokens=%d "
            "cached_tokens=%d ttft_ms=%s total_ms=%.1f finish_reason=%s", fields["protocol"],
            self.tenant or "-", status, fields["prompt_tokens"], fields["completion_tokens"],
            fields["cached_tokens"], "-" if ttft_ms is None else f"{ttft_ms:.1f}",
            fields["total_ms"], fields["finish_reason"] or "-", extra=fields)
