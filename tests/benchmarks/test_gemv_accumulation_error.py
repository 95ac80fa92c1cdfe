"""benchmarks/gemv_accumulation_error.py: its chained product, and its measure on real
SmolLM2 weights (float16 keeps 3 more mantissa bits than bfloat16: its error is far
smaller at every chain length)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from gridllm.common.presets import is_preset_available
from tests.benchmarks.conftest import load_benchmark


def _module():
    return load_benchmark("gemv_accumulation_error")


def test_a_chain_in_float64_is_the_exact_product_and_bfloat16_rounds_each_step():
    module = _module()
    torch.manual_seed(0)
    w, x = torch.randn(8, 64), torch.randn(64)
    exact = w.double() @ x.double()
    torch.testing.assert_close(module.chained(w, x, 4, torch.float64), exact)
    one = module.chained(w[:1, :2], x[:2], 2, torch.bfloat16)
    first = (w[0, 0].double() * x[0].double()).to(torch.bfloat16).double()
    assert one.item() == (first + w[0, 1].double() * x[1].double()).to(torch.bfloat16).item()


@pytest.mark.slow
@pytest.mark.skipif(not is_preset_available("smollm2-135m"),
                    reason="smollm2-135m is not in the cache (make test fetches it)")
def test_float16_chains_err_far_less_than_bfloat16_ones(tmp_path, monkeypatch):
    module = _module()
    output = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["x", "--tokens", "2", "--chains", "1", "8",
                                      "--output", str(output)])
    module.main()
    results = json.loads(output.read_text())["results"]
    by = {(r["projection"], r["dtype"]): r for r in results}
    for projection in ("o", "down"):
        half, brain = by[(projection, "float16")], by[(projection, "bfloat16")]
        for chain in ("chain_1", "chain_8"):
            assert 0 < half[chain] < brain[chain] / 4, (projection, chain, half, brain)
