"""Serving metrics from per-request timestamps: TTFT, TPOT, ITL, end-to-end latency.

Definitions (those of ``vllm bench serve``):

- TTFT: first chunk carrying tokens minus the time the request was sent;
- TPOT: ``(last token time - first token time) / (output tokens - 1)``, per request with at
  least two output tokens;
- ITL: the gaps between consecutive chunks carrying tokens, pooled over all requests (a
  chunk with several tokens counts as one gap);
- E2E latency: last response minus send time;
- throughput: totals over the benchmark's duration (first send to last completion).

Statistics are the mean and the p50/p90/p99 percentiles with linear interpolation
(``numpy.percentile``'s default), in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """Timestamps (seconds, one monotonic clock) of one benchmark request."""

    input_len: int
    # max_tokens asked for.
    output_len: int
    send_time: float
    # Arrival time of each response that carried tokens, and how many it carried.
    chunk_times: list[float] = field(default_factory=list)
    chunk_num_tokens: list[int] = field(default_factory=list)
    end_time: float | None = None
    error: str | None = None

    @property
    def is_success(self) -> bool:
        return self.error is None and self.end_time is not None and bool(self.chunk_times)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.chunk_num_tokens)


def summarize(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """Mean and percentiles of ``values`` times ``scale`` (seconds -> ms by default)."""
    if not len(values):
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    array = np.asarray(values, dtype=np.float64) * scale
    stats: dict[str, float | None] = {"mean": float(array.mean())}
    stats.update({f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES})
    return stats


def compute_serve_metrics(records: Sequence[RequestRecord], duration_s: float
                          ) -> dict[str, Any]:
    """Aggregate metrics of a serving run.

    Args:
        records: one per request sent (failed ones count in ``num_failed`` only).
        duration_s: wall time of the run.
    Returns:
        Counts, throughputs and ``ttft_ms`` / ``tpot_ms`` / ``itl_ms`` / ``e2e_latency_ms``
        statistics (mean, p50, p90, p99).
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}.")
    done = [r for r in records if r.is_success]
    ttfts = [r.chunk_times[0] - r.send_time for r in done]
    tpots = [(r.chunk_times[-1] - r.chunk_times[0]) / (r.num_output_tokens - 1)
             for r in done if r.num_output_tokens > 1]
    itls = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    e2es = [r.end_time - r.send_time for r in done]  # type: ignore[operator]
    input_tokens = sum(r.input_len for r in done)
    output_tokens = sum(r.num_output_tokens for r in done)
    return {
        "num_completed": len(done),
        "num_failed": len(records) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "requests_per_s": len(done) / duration_s,
        "output_tokens_per_s": output_tokens / duration_s,
        "total_tokens_per_s": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": summarize(ttfts),
        "tpot_ms": summarize(tpots),
        "itl_ms": summarize(itls),
        "e2e_latency_ms": summarize(e2es),
    }
