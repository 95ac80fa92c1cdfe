"""Fits the cost model's prefill term: the simulator, running the real scheduler core on
the seeded dataset of a measured throughput run, must take that run's wall time."""

from __future__ import annotations

import dataclasses

from gridllm.bench.datasets import random_requests
from gridllm.bench.sim.cluster import VOCAB_SIZE, FleetConfig, SimRequest, Simulation
from gridllm.bench.sim.cost import FIT_TARGET, CostModel


def simulated_wall_s(cost: CostModel, target: dict = FIT_TARGET) -> float:
    """Seconds one simulated worker takes for the target's requests, all sent at once."""
    requests = random_requests(target["num_prompts"], target["input_len_range"],
                               target["output_len_range"], VOCAB_SIZE, seed=0,
                               excluded_token_ids=(0, 1, 2))
    sim = Simulation(FleetConfig(num_workers=1, workers_per_scheduler=1, num_routers=1,
                                 max_num_seqs=target["max_num_seqs"],
                                 max_num_batched_tokens=target["max_num_batched_tokens"],
                                 num_kv_blocks=8192), cost)
    for i, request in enumerate(requests):
        sim.submit(SimRequest(f"t{i}", 0.0, request.prompt_token_ids, request.output_len))
    sim.run()
    return max(r.finish_s or 0.0 for r in sim.requests)


def fit_prefill(cost: CostModel, target: dict = FIT_TARGET, tolerance_s: float = 0.005
                ) -> CostModel:
    """``cost`` with the prefill term that makes the simulated wall time the target's
    (bisection: the wall time grows with the prefill cost)."""
    low, high = 0.0, 1.0
    while high - low > 1e-5:
        middle = (low + high) / 2
        wall = simulated_wall_s(dataclasses.replace(cost, prefill_ms_per_token=middle), target)
        if abs(wall - target["wall_s"]) < tolerance_s:
            low = high = middle
            break
        if wall < target["wall_s"]:
            low = middle
        else:
            high = middle
    return dataclasses.replace(cost, prefill_ms_per_token=(low + high) / 2)
