"""``LoopHistogram`` against prometheus_client's ``Histogram``: the same exposition."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gridllm.common.metrics import TOKEN_LATENCY_BUCKETS, LoopHistogram


def _samples(registry: CollectorRegistry) -> dict:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_loop_histogram_exposes_what_prometheus_histogram_does():
    """Observations on bucket bounds, between them, past the last and repeated ones (count >
    1) give the reference's buckets, count and sum, and the same HELP/TYPE lines."""
    rng = random.Random(0)
    values = ([0.0, *TOKEN_LATENCY_BUCKETS, 1e6]
              + [rng.uniform(0, 1.2) for _ in range(300)]
              + [rng.expovariate(50.0) for _ in range(300)])
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = LoopHistogram("gridllm:gap_seconds", "Gaps.", TOKEN_LATENCY_BUCKETS, ours)
    reference = Histogram("gridllm:gap_seconds", "Gaps.", buckets=TOKEN_LATENCY_BUCKETS,
                          registry=theirs)
    for i, value in enumerate(values):
        repeats = 1 + i % 3
        fast.observe(value, repeats)
        for _ in range(repeats):
            reference.observe(value)
    got, want = _samples(ours), _samples(theirs)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    help_type = [line for line in generate_latest(theirs).decode().splitlines()
                 if line.startswith("#")]
    assert [line for line in generate_latest(ours).decode().splitlines()
            if line.startswith("#")] == help_type


def test_loop_histogram_refuses_unordered_buckets():
    with pytest.raises(ValueError, match="buckets"):
        LoopHistogram("gridllm:x", "X.", (0.1, 0.1, 0.2))
