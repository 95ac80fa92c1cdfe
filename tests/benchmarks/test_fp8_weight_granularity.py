"""benchmarks/fp8_weight_granularity.py: its round trip (every scale's e4m3 rounding
within half a step of 3 mantissa bits, finer scales no coarser), and a short run on real
SmolLM2 weights (its bfloat16 row nearer float32 than any e4m3 row)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from gridllm.common.presets import is_preset_available
from tests.benchmarks.conftest import load_benchmark


def test_round_trip_rounds_to_e4m3_at_each_granularity():
    bench = load_benchmark("fp8_weight_granularity")
    gen = torch.Generator().manual_seed(0)
    # Rows and groups of very different magnitudes, so the granularity matters.
    w = torch.randn(8, 64, generator=gen) * torch.logspace(-3, 1, 64)[None, :]
    errors = {}
    for granularity in ("tensor", "channel", 16, 4):
        got = bench.round_trip(w, granularity)
        assert got.shape == w.shape and got.dtype == torch.float32
        # Normal e4m3 values: half a step of 3 mantissa bits, 2^-4 relative; below e4m3's
        # smallest normal (2^-6 of the scale unit) a fixed step of 2^-9 units.
        n, k = w.shape
        size = {"tensor": n * k, "channel": k}.get(granularity, granularity)
        groups = w.reshape(-1, size)
        unit = (groups.abs().amax(-1, keepdim=True) / 448).expand_as(groups).reshape(n, k)
        bound = torch.maximum(w.abs() * 2.0 ** -4, unit * 2.0 ** -10)
        assert ((got - w).abs() <= bound * (1 + 1e-6)).all(), granularity
        errors[granularity] = ((got - w).abs() / w.abs()).mean().item()
    assert errors[4] <= errors[16] <= errors["channel"] <= errors["tensor"]
    assert torch.equal(bench.round_trip(w, "bf16"), w.bfloat16().float())
    with pytest.raises(ValueError, match="group 5 does not divide the inputs"):
        bench.round_trip(w, 5)


@pytest.mark.slow
@pytest.mark.skipif(not is_preset_available("smollm2-135m"),
                    reason="smollm2-135m is not in the cache (make test fetches it)")
def test_a_short_run_on_smollm2(tmp_path, monkeypatch):
    output = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["x", "--num-new", "2", "--groups", "64",
                                      "--output", str(output)])
    load_benchmark("fp8_weight_granularity").main()
    rows = {r["variant"]: r for r in json.loads(output.read_text())["results"]}
    bf16 = rows["weights rounded to bfloat16"]
    for name in ("weights e4m3, a scale per tensor", "weights e4m3, a scale per channel",
                 "weights e4m3, a scale per 64 inputs"):
        assert 0 < bf16["mean_kl"] < rows[name]["mean_kl"]
        assert bf16["max_logit_error"] < rows[name]["max_logit_error"]
