"""Shared-prefix traffic: requests that start with one of a few long prefixes (few-shot
templates, system prompts), mixed with unique ones; token-id prompts, seeded.

Used by the routing benchmarks (benchmarks/prefix_routing_cpu.py, benchmarks/simulate.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gridllm.bench.datasets import BenchRequest


@dataclass
class SharedPrefixWorkload:
    num_requests: int = 128
    num_prefixes: int = 16
    prefix_len: int = 512
    # Unique tokens after the prefix (unique prompts have prefix_len + suffix_len tokens).
    suffix_len: int = 32
    # Fraction of the requests that start with a shared prefix (chosen uniformly).
    shared_fraction: float = 0.8
    output_len: int = 8
    vocab_size: int = 512
    # Token ids below this are left out (BOS, EOS, PAD of small vocabularies).
    min_token_id: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_requests", "num_prefixes", "prefix_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.suffix_len < 0:
            raise ValueError(f"suffix_len must be non-negative, got {self.suffix_len}.")
        if not 0.0 <= self.shared_fraction <= 1.0:
            raise ValueError(f"shared_fraction must be in [0, 1], got {self.shared_fraction}.")
        if self.vocab_size <= self.min_token_id + 1:
            raise ValueError(f"vocab_size must exceed min_token_id + 1, got {self.vocab_size}.")


def shared_prefix_requests(workload: SharedPrefixWorkload
                           ) -> tuple[list[BenchRequest], list[int]]:
    """The requests, and for each the index of its shared prefix (-1: a unique prompt).

    Every request's own tokens are drawn fresh, so two requests share exactly their prefix.
    """
    rng = random.Random(workload.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(workload.min_token_id, workload.vocab_size) for _ in range(n)]

    prefixes = [tokens(workload.prefix_len) for _ in range(workload.num_prefixes)]
    requests, prefix_ids = [], []
    for _ in range(workload.num_requests):
        if rng.random() < workload.shared_fraction:
            index = rng.randrange(workload.num_prefixes)
            prompt = prefixes[index] + tokens(workload.suffix_len)
        else:
            index = -1
            prompt = tokens(workload.prefix_len + workload.suffix_len)
        requests.append(BenchRequest(prompt, workload.output_len))
        prefix_ids.append(index)
    return requests, prefix_ids
