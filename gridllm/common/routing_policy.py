"""Routing policies: which of several schedulers (or workers) gets a request.

One small, swappable piece, pure (no I/O): the router picks a scheduler with it, a
scheduler picks one of its workers with ``cache_aware``, and the cluster simulator
(benchmarks/simulate.py) runs both:

- ``cache_aware`` (default): the lowest cost, in prompt-token equivalents of work ahead of
  the request's first token: its prompt tokens not cached there, plus the tokens queued
  there, plus ``running_weight`` per request there, plus a penalty as the KV pool nears
  full (its cache is about to be evicted, its requests preempted: at a full pool the prompt
  counts ``1 + kv_weight`` times). Overlap and load trade off in one unit, as in Dynamo's
  KV router. Candidates within ``tie_tolerance`` (a fraction) of the best cost count as
  tied and a seeded random draw picks among them, so several routers sharing one stale
  view do not all herd onto one target.
- ``least_load``: fewest requests (then fewest queued tokens), ties in rotation.
- ``round_robin``: in turn, ignoring load and cache.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from gridllm.common.config import require

POLICY_NAMES = ("cache_aware", "least_load", "round_robin")


@dataclass
class Candidate:
    """What a policy knows of one target."""

    name: str
    # Leading prompt blocks cached there.
    num_overlap_blocks: int = 0
    num_running: int = 0
    num_waiting: int = 0
    # Tokens (prompt + output so far) of the waiting requests.
    num_queued_tokens: int = 0
    # Fraction of the KV pool held by requests.
    kv_usage: float = 0.0
    # Requests this router has in flight there (exact, where reported load lags).
    num_inflight: int = 0

    @property
    def load(self) -> int:
        return max(self.num_running + self.num_waiting, self.num_inflight)


@dataclass
class CacheAwarePolicy:
    """Lowest estimated work ahead of the first token (see the module docstring).

    Args:
        running_weight: prompt-token equivalents one running or queued request costs a
            newcomer (it slows every step the newcomer's prefill shares).
        kv_threshold: KV usage above which the penalty starts.
        kv_weight: the penalty at a full pool, in prompts (it grows linearly from 0 at
            ``kv_threshold``).
        tie_tolerance: costs within this fraction of the best one are tied.
        seed: of the tie-break draw.
    """

    running_weight: float = 4.0
    kv_threshold: float = 0.9
    kv_weight: float = 2.0
    tie_tolerance: float = 0.05
    seed: int = 0
    name: str = "cache_aware"

    def __post_init__(self) -> None:
        require(self.running_weight >= 0, "running_weight", "must be non-negative",
                self.running_weight)
        require(0.0 <= self.kv_threshold < 1.0, "kv_threshold", "must be in [0, 1)",
                self.kv_threshold)
        require(self.kv_weight >= 0, "kv_weight", "must be non-negative", self.kv_weight)
        require(self.tie_tolerance >= 0, "tie_tolerance", "must be non-negative",
                self.tie_tolerance)
        self._rng = random.Random(self.seed)

    def cost(self, candidate: Candidate, num_prompt_tokens: int, block_size: int) -> float:
        uncached = max(num_prompt_tokens - candidate.num_overlap_blocks * block_size, 0)
        pressure = max(candidate.kv_usage - self.kv_threshold, 0.0) / (1.0 - self.kv_threshold)
        return (uncached + candidate.num_queued_tokens + self.running_weight * candidate.load
                + self.kv_weight * pressure * num_prompt_tokens)

    def choose(self, candidates: Sequence[Candidate], num_prompt_tokens: int,
               block_size: int) -> int:
        """The index of the chosen candidate (there is at least one)."""
        costs = [self.cost(c, num_prompt_tokens, block_size) for c in candidates]
        best = min(costs)
        tied = [i for i, cost in enumerate(costs) if cost <= best * (1.0 + self.tie_tolerance)]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


@dataclass
class LeastLoadPolicy:
    """Fewest requests, then fewest queued tokens; ties taken in rotation."""

    name: str = "least_load"

    def __post_init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Candidate], num_prompt_tokens: int,
               block_size: int) -> int:
        keys = [(c.load, c.num_queued_tokens) for c in candidates]
        best = min(keys)
        tied = [i for i, key in enumerate(keys) if key == best]
        self._turn += 1
        return tied[self._turn % len(tied)]


@dataclass
class RoundRobinPolicy:
    """Each candidate in turn (by position), whatever its load or cache."""

    name: str = "round_robin"

    def __post_init__(self) -> None:
        self._turn = -1

    def choose(self, candidates: Sequence[Candidate], num_prompt_tokens: int,
               block_size: int) -> int:
        self._turn += 1
        return self._turn % len(candidates)


RoutingPolicy = CacheAwarePolicy | LeastLoadPolicy | RoundRobinPolicy


def make_policy(name: str, seed: int = 0) -> RoutingPolicy:
    """The policy called ``name`` (ValueError naming ``routing_policy`` otherwise)."""
    require(name in POLICY_NAMES, "routing_policy", f"must be one of {POLICY_NAMES}", name)
    if name == "cache_aware":
        return CacheAwarePolicy(seed=seed)
    if name == "least_load":
        return LeastLoadPolicy()
    return RoundRobinPolicy()
