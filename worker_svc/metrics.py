"""The worker's Prometheus metrics: its own step time, steps and tokens, its KV pool, and
the model as served (an info gauge).

The scheduler sees each step from outside (round trip, tokens per step); these are the
worker's side: how long ``execute_model`` ran, measured in the runner's thread.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gridllm.common.metrics import TOKEN_COUNT_BUCKETS, TOKEN_LATENCY_BUCKETS, metric

# WorkerInfo fields the model_info gauge carries as labels.
_INFO_LABELS = ("model", "dtype", "quantization", "kv_cache_dtype", "kv_cache_scales",
                "block_size", "device")


class WorkerMetrics:
    """The worker's metrics on a registry of their own (``self.registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.step_time = Histogram(
            metric("worker_step_time_seconds"), "Seconds the model runner took per step "
            "(forward and sampling).", buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.step_tokens = Histogram(
            metric("worker_step_tokens"), "Tokens computed per step.",
            buckets=TOKEN_COUNT_BUCKETS, registry=r)
        self.num_steps = Counter(metric("worker_steps"), "Steps run.", registry=r)
        self.num_requests = Counter(metric("worker_requests"), "Requests started here "
                                    "(a preempted request counts again when it resumes).",
                                    registry=r)
        self.num_kv_blocks = Gauge(metric("worker_num_kv_blocks"), "Blocks in the KV pool.",
                                   registry=r)
        self.model_info = Gauge(
            metric("worker_model_info"), "The model as served, in labels (value 1): name, "
            "dtype, weight quantization, KV cache dtype, where an FP8 cache's scales come "
            "from, block size, device.",
            list(_INFO_LABELS), registry=r)

    def set_info(self, info) -> None:
        """The ``model_info`` labels from the worker's ``WorkerInfo``."""
        self.model_info.labels(**{label: str(getattr(info, label))
                                  for label in _INFO_LABELS}).set(1)

    def on_step(self, seconds: float, num_tokens: int, num_new_requests: int) -> None:
        self.step_time.observe(seconds)
        self.step_tokens.observe(num_tokens)
        self.num_steps.inc()
        if num_new_requests:
            self.num_requests.inc(num_new_requests)
