"""Benchmarks of a sharded model: ``--tensor-parallel-size`` reaches the engine, the roofline
counts every card and the whole model's weights (not rank 0's shard)."""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch

from gridllm.bench import main as bench_main
from gridllm.bench.latency import LatencyConfig, run_latency
from gridllm.bench.roofline import model_decode_weight_bytes, roofline
from gridllm.bench.throughput import ThroughputConfig

TINY = "random:tiny"


def _no_rank_processes() -> bool:
    return not [p for p in multiprocessing.active_children() if p.name.startswith("gridllm-tp")]


def test_the_roofline_of_several_cards_reads_their_bandwidth_together():
    limits = {"device": "x", "copy_bandwidth_gbps": 1000.0}
    one, two = roofline(2_000_000_000, limits), roofline(2_000_000_000, limits, num_gpus=2)
    assert two["num_gpus"] == 2
    assert two["roofline_tokens_per_s"] == pytest.approx(2 * one["roofline_tokens_per_s"])
    assert two["roofline_ms_per_token"] == pytest.approx(one["roofline_ms_per_token"] / 2)


def test_bench_configs_refuse_a_bad_tensor_parallel_size():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ThroughputConfig(model=TINY, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LatencyConfig(model=TINY, tensor_parallel_size=0)


@pytest.mark.slow
def test_latency_of_two_ranks_counts_the_whole_models_weights():
    result = run_latency(LatencyConfig(model=TINY, input_len=8, output_len=6, num_iters=2,
                                       device="cpu", tensor_parallel_size=2, use_tqdm=False))
    assert result["config"]["tensor_parallel_size"] == 2
    assert result["roofline"]["num_gpus"] == 2
    assert result["roofline"]["weight_bytes"] == model_decode_weight_bytes(TINY, torch.float32)
    assert result["decode_tokens_per_s"] > 0
    assert _no_rank_processes()


@pytest.mark.slow
def test_throughput_cli_runs_two_ranks(tmp_path):
    out = tmp_path / "tp.json"
    args = ["throughput", "--model", TINY, "--num-prompts", "4", "--input-len-range", "4:12",
            "--output-len-range", "2:5", "--max-num-seqs", "4", "--device", "cpu",
            "--kv-cache-memory", str(1 << 22), "--no-tqdm", "--output", str(out)]
    assert bench_main([*args, "--tensor-parallel-size", "2"]) == 0
    sharded = json.loads(out.read_text())
    assert bench_main(args) == 0
    single = json.loads(out.read_text())
    assert sharded["config"]["tensor_parallel_size"] == 2
    assert sharded["gridllm"]["num_requests"] == 4
    assert (sharded["gridllm"]["total_output_tokens"]
            == single["gridllm"]["total_output_tokens"])
    assert _no_rank_processes()


@pytest.mark.slow
def test_collectives_time_a_steps_all_reduces_over_the_ranks(tmp_path):
    from gridllm.bench.collectives import CollectivesConfig, format_result, run_collectives
    from gridllm.common.random_presets import random_model_config

    hf_config = random_model_config(TINY)
    result = run_collectives(CollectivesConfig(model=TINY, tensor_parallel_size=2,
                                               batch_sizes=(1, 4), device="cpu",
                                               num_iters=3, num_warmup=1))
    # o_proj and down_proj in every layer, plus the embedding.
    assert result["shapes"] == {"hidden_size": hf_config.hidden_size,
                                "vocab_per_rank": -(-hf_config.vocab_size // 2),
                                "num_all_reduces": 2 * hf_config.num_hidden_layers + 1}
    assert result["backend"] == "gloo"
    assert [r["batch_size"] for r in result["results"]] == [1, 4]
    for row in result["results"]:
        assert row["all_reduce_bytes"] == row["batch_size"] * hf_config.hidden_size * 4
        assert row["all_reduce_us"] > 0 and row["step_eager_ms"] > 0
        assert row["step_graph_ms"] is None  # CUDA only
    assert "5 all-reduces" in format_result(result)
    assert not [p for p in multiprocessing.active_children()
                if p.name.startswith("gridllm-collectives")]


def test_collectives_refuse_what_they_cannot_time(monkeypatch):
    import gridllm.bench.roofline
    from gridllm.bench.collectives import CollectivesConfig, step_shapes
    from gridllm.common.random_presets import random_model_config

    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 2"):
        CollectivesConfig(model=TINY, tensor_parallel_size=1)
    with pytest.raises(ValueError, match="batch_sizes"):
        CollectivesConfig(model=TINY, batch_sizes=(0,))
    assert bench_main(["collectives", "--model", TINY, "--batch-sizes", "one"]) == 2
    # A model built of plain layers has nothing to time (every shipped one is sharded).
    monkeypatch.setattr(gridllm.bench.roofline, "meta_model", lambda model, dtype: (
        torch.nn.Sequential(torch.nn.Linear(4, 4)), random_model_config(TINY)))
    with pytest.raises(ValueError, match="is not sharded"):
        step_shapes(TINY, 2)
