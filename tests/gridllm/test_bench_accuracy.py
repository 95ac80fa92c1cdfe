"""gridllm bench accuracy: the harness row (gridllm float32 against transformers float32)
agrees everywhere with a tiny error, and the quantized rows err more, on a tiny checkpoint
without a tokenizer (seeded random prompts); bad settings name their field."""

from __future__ import annotations

import json

import pytest

from gridllm.bench import main as bench_main
from gridllm.bench.accuracy import AccuracyConfig, run_accuracy


def _rows(result) -> dict:
    return {r["variant"]: r for r in result["rows"]}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_quantized_rows_err_more_than_the_harness(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    result = run_accuracy(AccuracyConfig(model=model_dir, quantization="fp8",
                                         kv_cache_dtype="fp8", num_new=6))
    rows = _rows(result)
    assert list(rows) == ["transformers bfloat16", "gridllm float32",
                          "gridllm float32, quantization=fp8, kv_cache_dtype=fp8"]
    harness = rows["gridllm float32"]
    assert harness["top1_agreement"] == 1.0 and harness["max_logit_error"] < 1e-3
    quantized = rows["gridllm float32, quantization=fp8, kv_cache_dtype=fp8"]
    assert quantized["max_logit_error"] > 100 * harness["max_logit_error"]
    assert quantized["mean_kl"] > harness["mean_kl"]
    assert result["num_prompts"] == 8 and result["num_new"] == 6


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_cli_writes_the_rows(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "r.json"
    code = bench_main(["accuracy", "--model", tiny_model_dir("llama"), "--kv-cache-dtype",
                       "fp8_e5m2", "--calculate-kv-scales", "--num-new", "3",
                       "--output", str(output)])
    assert code == 0
    rows = _rows(json.loads(output.read_text()))
    assert "gridllm float32, kv_cache_dtype=fp8_e5m2, calculate_kv_scales" in rows
    assert "top-1 agreement" in capsys.readouterr().out


def test_bad_settings_name_the_field(tiny_model_dir):
    with pytest.raises(ValueError, match="model"):
        AccuracyConfig(model="random:llama3-8b")
    with pytest.raises(ValueError, match="num_new"):
        AccuracyConfig(model=tiny_model_dir("llama"), num_new=0)
    with pytest.raises(ValueError, match="prompts"):
        AccuracyConfig(model=tiny_model_dir("llama"), prompts=[])
    assert bench_main(["accuracy", "--model", "random:llama3-8b"]) == 2
