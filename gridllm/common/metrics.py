"""Prometheus metrics shared by the services: bucket ladders, and serving a registry.

Names follow vLLM's with the prefix ``gridllm:`` (``gridllm:time_to_first_token_seconds``),
so dashboards written for vLLM port by renaming. Each server builds its metrics on a
registry of its own (``CollectorRegistry``), so several servers in one process (tests) never
collide, and serves it at ``GET /metrics``: the router on its HTTP port, the scheduler and the
workers on their ``--metrics-port``.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.asgi import make_asgi_app
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gridllm.common.http_server import HttpServer

logger = logging.getLogger(__name__)

# No ``*_created`` series next to each counter and histogram (as vLLM): they double the
# output and no dashboard reads them.
disable_created_metrics()

PREFIX = "gridllm:"
# Seconds, from a fast GPU's decode step (ms) to a long queue (minutes); vLLM's ladders with
# finer steps at the low end.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025,
                         0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                         2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                           20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
                           7680.0)
# Token counts (prompt, completion, tokens per step): 1, 2, 5 times powers of ten.
TOKEN_COUNT_BUCKETS = tuple(float(m * 10 ** e) for e in range(6) for m in (1, 2, 5))


def metric(name: str) -> str:
    """``name`` with the ``gridllm:`` prefix."""
    return PREFIX + name


class LoopHistogram(Collector):
    """A label-less histogram observed from one thread (an event loop), exposed exactly as a
    ``prometheus_client.Histogram`` of the same name and buckets.

    ``Histogram.observe`` takes a lock per bucket and scans the buckets in Python; this one
    bisects and adds, and takes many equal observations at once: the router observes each
    streamed token's gap. A scrape from another thread reads a snapshot whose count is the
    sum of its buckets (the sum may miss an observation made meanwhile).

    Args:
        name: the metric's name (without ``_bucket``/``_sum``/``_count``).
        documentation: its help text.
        buckets: upper bounds, increasing (``+Inf`` is added).
        registry: where it is served from (None: not registered).
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry | None = None):
        bounds = [float(b) for b in buckets]
        if any(b >= c for b, c in itertools.pairwise(bounds)):
            raise ValueError(f"buckets of {name} must increase, got {list(buckets)}.")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.name = name
        self.documentation = documentation
        self._bounds = bounds
        self._counts = [0] * len(bounds)
        self._sum = 0.0
        if registry is not None:
            registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        """``count`` observations of ``value``."""
        self._counts[bisect.bisect_left(self._bounds, value)] += count
        self._sum += value * count

    def collect(self) -> Iterator[Metric]:
        cumulative = itertools.accumulate(list(self._counts))
        buckets = [(floatToGoString(bound), count)
                   for bound, count in zip(self._bounds, cumulative, strict=True)]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets,
                                    sum_value=self._sum)

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation)


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> HttpServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0: a free one) in this event
    loop; the caller stops the returned server."""
    server = HttpServer(_metrics_only(make_asgi_app(registry)), host, port, "metrics")
    await server.start()
    logger.info("metrics at http://%s:%d/metrics", host, server.port)
    return server


def _metrics_only(app):
    async def serve(scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in ("/metrics", "/metrics/"):
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"not found: GET /metrics\n"})
            return
        await app(scope, receive, send)
    return serve
