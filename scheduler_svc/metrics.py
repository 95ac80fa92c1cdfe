"""The scheduler's Prometheus metrics: queues, KV cache, prefix cache, step loop, Redis mirror.

Gauges and cumulative counts (requests running and waiting, KV-cache usage, prefix-cache
queries and hits, preemptions) are read from the worker pool when scraped, per worker. The
per-request phases (queue, prefill, decode, inference time) and the per-step numbers
(tokens per step, scheduler<->worker round trip, the worker's own step time) are observed
from each step's output in the step loop; the Redis mirror reports its lag per flush.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gridllm.common.contract import RequestUpdate, SchedulerOutput
from gridllm.common.metrics import (
    LATENCY_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TOKEN_COUNT_BUCKETS,
    TOKEN_LATENCY_BUCKETS,
    metric,
)

if TYPE_CHECKING:
    from scheduler_svc.servicer import SchedulerServicer
    from scheduler_svc.worker_link import WorkerLink
    from scheduler_svc.worker_pool import WorkerPool


class _PoolCollector:
    """Per-worker state of the pool, read at scrape time (in the event loop)."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool

    def collect(self):
        running = GaugeMetricFamily(metric("num_requests_running"),
                                    "Requests running (holding KV blocks).", labels=["worker_id"])
        waiting = GaugeMetricFamily(metric("num_requests_waiting"), "Requests queued.",
                                    labels=["worker_id"])
        usage = GaugeMetricFamily(metric("kv_cache_usage_perc"), "Fraction of the worker's KV "
                                  "blocks held by requests (0 to 1).", labels=["worker_id"])
        queries = CounterMetricFamily(metric("prefix_cache_queries"), "Prompt tokens looked up "
                                      "in the prefix cache.", labels=["worker_id"])
        hits = CounterMetricFamily(metric("prefix_cache_hits"), "Prompt tokens found in the "
                                   "prefix cache.", labels=["worker_id"])
        preemptions = CounterMetricFamily(metric("num_preemptions"), "Requests preempted (by "
                                          "recompute).", labels=["worker_id"])
        alive = GaugeMetricFamily(metric("num_workers_alive"), "Workers linked and serving.")
        num_alive = 0
        # A link enters pool.links with its scheduler core built.
        for link in list(self.pool.links.values()):
            core, bm, labels = link.scheduler, link.scheduler.block_manager, [link.worker_id]
            running.add_metric(labels, core.num_running)
            waiting.add_metric(labels, core.num_waiting)
            usage.add_metric(labels, 1.0 - bm.num_free_blocks / max(bm.num_blocks, 1))
            queries.add_metric(labels, bm.prefix_cache_queries)
            hits.add_metric(labels, bm.prefix_cache_hits)
            preemptions.add_metric(labels, core.num_preemptions)
            num_alive += int(link.is_alive)
        alive.add_metric([], num_alive)
        return [running, waiting, usage, queries, hits, preemptions, alive]


class _StreamCollector:
    """Messages the response streams carried to their clients, read at scrape time."""

    def __init__(self, servicer: SchedulerServicer):
        self.servicer = servicer

    def collect(self):
        messages = CounterMetricFamily(
            metric("scheduler_stream_messages"), "Messages written to the clients' response "
            "streams: one per request per step on Submit, one per session per step (for all "
            "its requests) on Session.", labels=["rpc"])
        updates = CounterMetricFamily(
            metric("scheduler_stream_updates"), "Request updates (and per-request errors) "
            "those messages carried.", labels=["rpc"])
        sessions = GaugeMetricFamily(
            metric("scheduler_sessions_open"), "Session streams open now (one per router "
            "that has sent requests here).")
        for rpc, num in self.servicer.num_messages.items():
            messages.add_metric([rpc], num)
        for rpc, num in self.servicer.num_updates.items():
            updates.add_metric([rpc], num)
        sessions.add_metric([], len(self.servicer.sessions))
        return [messages, updates, sessions]


@dataclass
class _Timing:
    arrival: float
    scheduled: float
    first_token: float | None = None


class SchedulerMetrics:
    """The scheduler service's metrics on a registry of their own.

    Args:
        pool: the workers (read when scraped).
        registry: where to register (None: a new one, ``self.registry``).
        streams: the servicer whose response-stream messages are counted (None: not).
    """

    def __init__(self, pool: WorkerPool, registry: CollectorRegistry | None = None,
                 streams: SchedulerServicer | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        r.register(_PoolCollector(pool))
        if streams is not None:
            r.register(_StreamCollector(streams))
        self.queue_time = Histogram(
            metric("request_queue_time_seconds"), "Seconds a request waited before it was "
            "first scheduled.", buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram(
            metric("request_prefill_time_seconds"), "Seconds from a request's first step to "
            "its first token.", buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram(
            metric("request_decode_time_seconds"), "Seconds from a request's first token to "
            "its last.", buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.inference_time = Histogram(
            metric("request_inference_time_seconds"), "Seconds from a request's first step to "
            "its end.", buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.iteration_tokens = Histogram(
            metric("iteration_tokens_total"), "Tokens (prompt chunks + decodes) per step.",
            buckets=TOKEN_COUNT_BUCKETS, registry=r)
        self.step_round_trip = Histogram(
            metric("scheduler_step_round_trip_seconds"), "Seconds from sending a step to a "
            "worker to reading its answer (with two steps in flight, this includes the "
            "previous step's run).", ["worker_id"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.worker_step_time = Histogram(
            metric("scheduler_worker_step_time_seconds"), "Seconds each step ran on its "
            "worker, as the worker reported.", ["worker_id"], buckets=TOKEN_LATENCY_BUCKETS,
            registry=r)
        self.mirror_lag = Histogram(
            metric("redis_mirror_lag_seconds"), "Seconds from a step's change of block state "
            "to its write to Redis.", buckets=LATENCY_BUCKETS, registry=r)
        self._timings: dict[str, _Timing] = {}

    def on_step(self, link: WorkerLink, output: SchedulerOutput,
                updates: list[RequestUpdate]) -> None:
        """Observe one step (called by the step loop with its output and updates)."""
        now = time.monotonic()
        sent = link.last_step_sent_at or now
        worker_id = link.worker_id
        self.iteration_tokens.observe(output.total_num_scheduled_tokens)
        self.step_round_trip.labels(worker_id).observe(now - sent)
        self.worker_step_time.labels(worker_id).observe(link.last_step_execute_s)
        requests = link.scheduler.requests
        timings = self._timings
        for new in output.scheduled_new_reqs:
            request = requests.get(new.req_id)
            if request is not None and new.req_id not in timings:
                timings[new.req_id] = _Timing(request.arrival_time, sent)
                self.queue_time.observe(max(sent - request.arrival_time, 0.0))
        for update in updates:
            timing = timings.get(update.req_id)
            if timing is None:
                continue
            if update.new_token_ids and timing.first_token is None:
                timing.first_token = now
                self.prefill_time.observe(now - timing.scheduled)
            if update.finished:
                del timings[update.req_id]
                if timing.first_token is not None:
                    self.decode_time.observe(now - timing.first_token)
                self.inference_time.observe(now - timing.scheduled)
        for req_id in output.finished_req_ids:
            if req_id not in requests:  # aborted (a preempted request is still there)
                timings.pop(req_id, None)
