"""benchmarks/l2_prefetch.py's prefetch plans (the timing itself needs a GPU)."""

from __future__ import annotations

import torch

from kernels.l2_prefetch import CHUNK
from tests.benchmarks.conftest import load_benchmark


def test_plans_stay_in_the_budget_and_name_the_weights_they_read():
    bench = load_benchmark("l2_prefetch")
    chunk = CHUNK
    n = bench.NUM_LAYERS
    shapes = {"qkv": (6, 4), "o": (4, 4), "gate_up": (28, 4), "down": (4, 14)}
    weights = {name: [(torch.zeros(r * chunk // 4, c, dtype=torch.uint8), None)
                      for _ in range(n)] for name, (r, c) in shapes.items()}
    budget = 10 * chunk
    plans = bench._plans(weights, budget)
    assert all(not at_o for name in ("o+gate_up", "o+next_qkv") for at_o in plans[name][1])
    assert plans["+next@o"][0] is plans["o+gate_up"][0]
    for i in range(n):
        served = plans["o+gate_up"][0][i]
        assert [s.data_ptr() for s in served] == [weights["o"][i][0].data_ptr(),
                                                  weights["gate_up"][i][0].data_ptr()]
        assert [s.numel() for s in served] == [4 * chunk, 6 * chunk]
        ahead = plans["o+next_qkv"][0][i]
        assert ahead[0].data_ptr() == weights["o"][i][0].data_ptr()
        at_o = plans["+next@o"][1][i]
        if i + 1 < n:
            qkv = weights["qkv"][i + 1][0]
            assert ahead[1].data_ptr() == qkv.data_ptr()
            assert [s.numel() for s in ahead] == [4 * chunk, 6 * chunk]
            assert [(s.data_ptr(), s.numel()) for s in at_o] == [(qkv.data_ptr(),
                                                                  qkv.numel())]
        else:
            assert len(ahead) == 1 and at_o == []
