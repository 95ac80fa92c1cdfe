"""The cluster simulator (gridllm.bench.sim, benchmarks/simulate.py): its timing and cache
accounting against hand-computed references, and a bounded CLI run."""

from __future__ import annotations

import json
import os
import sys

import pytest

from gridllm.bench.sim.cluster import FleetConfig, SimRequest, Simulation, summarize
from gridllm.bench.sim.cost import FIT_TARGET, LLAMA3_8B_H100, CostModel
from gridllm.bench.sim.workloads import WorkloadConfig, add_workload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COST = CostModel(fixed_ms=5.0, prefill_ms_per_token=0.1, decode_ms_per_seq=0.2,
                 context_ms_per_token=0.001)
BLOCK = 16


def _prompt(seed: int, num: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 30_000 + 3 for i in range(num)]


def test_one_request_takes_the_cost_models_steps():
    sim = Simulation(FleetConfig(num_workers=1, num_routers=1), COST)
    request = SimRequest("r", 1.0, _prompt(1, 100), output_len=5)
    sim.submit(request)
    sim.run()
    # One prefill step (the whole prompt), then a decode step per further token.
    prefill = COST.step_s(100, 0, 100)
    decodes = sum(COST.step_s(0, 1, 100 + k) for k in range(1, 5))
    assert request.first_token_s == pytest.approx(1.0 + prefill)
    assert request.finish_s == pytest.approx(1.0 + prefill + decodes)
    assert summarize(sim).num_output_tokens == 5


@pytest.mark.parametrize("num_workers", [1, 3])
def test_hits_are_the_prefixes_seen_before_on_the_same_worker(num_workers):
    """Round-robin over one-worker schedulers, requests far apart: a request hits exactly
    its prefix's full blocks if an earlier request with that prefix ran on its worker."""
    prefixes = [_prompt(p, 4 * BLOCK) for p in range(3)]
    sequence = [0, 1, 0, 2, 0, 1, 1, 2, 0, 0, 2, 1]
    sim = Simulation(FleetConfig(num_workers=num_workers, workers_per_scheduler=1,
                                 num_routers=1, routing_policy="round_robin"), COST)
    for i, p in enumerate(sequence):
        sim.submit(SimRequest(f"r{i}", 10.0 * i, prefixes[p] + _prompt(100 + i, 8), 2))
    sim.run()
    seen, expected_hits = set(), 0
    for i, p in enumerate(sequence):
        worker = i % num_workers
        expected_hits += 4 * BLOCK if (p, worker) in seen else 0
        seen.add((p, worker))
    result = summarize(sim)
    assert result.num_finished == len(sequence)
    assert result.hit_rate == pytest.approx(expected_hits / (len(sequence) * (4 * BLOCK + 8)))
    assert [r.num_cached_tokens for r in sim.requests].count(4 * BLOCK) == \
        expected_hits // (4 * BLOCK)


def test_cache_aware_keeps_chat_sessions_on_their_cache():
    traffic = WorkloadConfig(sessions_per_worker=1, turns_per_session=3)
    results = {}
    for policy in ("round_robin", "cache_aware"):
        sim = Simulation(FleetConfig(num_workers=16, routing_policy=policy), LLAMA3_8B_H100)
        add_workload(sim, "chat", traffic)
        sim.run()
        results[policy] = summarize(sim)
    assert all(r.num_finished == r.num_requests == 48 for r in results.values())
    assert results["cache_aware"].hit_rate > results["round_robin"].hit_rate + 0.2


def test_the_cost_model_reproduces_the_run_it_was_fitted_to():
    from gridllm.bench.sim.fit import simulated_wall_s

    assert simulated_wall_s(LLAMA3_8B_H100) == pytest.approx(FIT_TARGET["wall_s"], rel=0.01)


def test_quick_cli_run_writes_results_and_a_plot(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import simulate
    finally:
        sys.path.pop(0)
    output = tmp_path / "sim.json"
    assert simulate.main(["--quick", "--workers", "8", "--output", str(output)]) == 0
    results = json.loads(output.read_text())["results"]
    assert {(r["workload"], r["policy"]) for r in results} == {
        (w, p) for w in ("fewshot", "chat")
        for p in ("cache_aware", "least_load", "round_robin")}
    assert all(r["num_finished"] == r["num_requests"] for r in results)
    assert (tmp_path / "sim.png").stat().st_size > 10_000
