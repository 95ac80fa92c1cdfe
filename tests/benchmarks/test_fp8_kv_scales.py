"""benchmarks/fp8_kv_scales.py on real SmolLM2 weights: its float32 row is the harness
(exact), the rescaled model's calculated scales give the unscaled model's row, and its
scales of 1.0 ruin the predictions."""

from __future__ import annotations

import json
import sys

import pytest

from gridllm.common.presets import is_preset_available
from tests.benchmarks.conftest import load_benchmark


@pytest.mark.slow
@pytest.mark.skipif(not is_preset_available("smollm2-135m"),
                    reason="smollm2-135m is not in the cache (make test fetches it)")
def test_scales_matter_only_outside_e4m3s_range(tmp_path, monkeypatch):
    output = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["x", "--num-new", "3", "--output", str(output)])
    load_benchmark("fp8_kv_scales").main()
    rows = {r["variant"]: r for r in json.loads(output.read_text())["results"]}
    assert rows["float32 cache"]["top1_agreement"] == 1.0
    calculated = rows["k, v x 2^12: fp8, calculate_kv_scales"]
    unscaled = rows["fp8, calibration amax at 224"]
    for key in ("top1_agreement", "max_logit_error", "mean_kl"):
        assert calculated[key] == pytest.approx(unscaled[key], rel=1e-3, abs=1e-6)
    assert unscaled["top1_agreement"] >= 0.85
    assert rows["k, v x 2^12: fp8, scales 1.0"]["top1_agreement"] < 0.5
