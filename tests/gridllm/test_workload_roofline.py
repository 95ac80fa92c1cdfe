"""The workload roofline of ``bench throughput``: the replayed schedule is the engine's,
and each step's bytes and FLOPs follow the model's geometry."""

import pytest
import torch

from gridllm import LLM
from gridllm.bench.datasets import BenchRequest
from gridllm.bench.roofline import meta_model
from gridllm.bench.throughput import format_result
from gridllm.bench.workload_roofline import StepCostModel, schedule_steps, workload_roofline
from gridllm.common.config import SchedulerConfig
from gridllm.common.contract import ModelLimits
from gridllm.common.sampling_params import SamplingParams

TINY = "random:tiny"


def _requests(lengths):
    return [BenchRequest(list(range(10 + i, 10 + i + n_in)), n_out)
            for i, (n_in, n_out) in enumerate(lengths)]


def test_step_cost_follows_the_geometry():
    model, config = meta_model(TINY, torch.bfloat16)
    cost = StepCostModel.from_model(model, config, torch.bfloat16)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layers, heads, kv_heads = (config.num_hidden_layers, config.num_attention_heads,
                               config.num_key_value_heads)
    head_dim = h // heads
    linear = layers * (h * (heads + 2 * kv_heads) * head_dim + h * h + 3 * h * i)
    assert cost.linear_flops_per_token == 2 * linear
    assert cost.lm_head_flops_per_request == 2 * v * h
    assert cost.kv_bytes_per_token == 2 * layers * kv_heads * head_dim * 2
    assert cost.attention_flops_per_pair == 4 * layers * heads * head_dim
    # A 3-token chunk after 5 cached tokens and a decode after 9.
    num_bytes, flops = cost.step_cost([(5, 3), (9, 1)])
    assert num_bytes == cost.weight_bytes + (8 + 10) * cost.kv_bytes_per_token
    pairs = (6 + 7 + 8) + 10
    assert flops == (4 * cost.linear_flops_per_token + 2 * cost.lm_head_flops_per_request
                     + pairs * cost.attention_flops_per_pair)


@pytest.mark.parametrize("budget", [64, 7])
def test_schedule_computes_every_token_once(budget):
    requests = _requests([(5, 3), (20, 1), (9, 6)])
    steps = schedule_steps(requests, SchedulerConfig(max_num_batched_tokens=budget),
                           ModelLimits(max_model_len=64, vocab_size=512, block_size=4), 64)
    assert sum(n for step in steps for _, n in step) == sum(
        r.input_len + r.output_len - 1 for r in requests)
    assert all(sum(n for _, n in step) <= budget for step in steps)


def test_schedule_is_the_engines():
    """Steps the engine runs (one in flight) for the same requests and budgets."""
    requests = _requests([(5, 3), (20, 4), (9, 6), (2, 2)])
    llm = LLM(TINY, device="cpu", block_size=4, num_kv_blocks=64, max_num_batched_tokens=8,
              max_num_seqs=3)
    llm.engine.max_steps_in_flight = 1
    steps = []
    execute = llm.engine.runner.execute_model_async

    def recording(output):
        if output.total_num_scheduled_tokens:
            steps.append(sorted(output.num_scheduled_tokens.values()))
        return execute(output)

    llm.engine.runner.execute_model_async = recording
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests],
                 [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
                  for r in requests], use_tqdm=False)
    scheduler = llm.engine.scheduler
    replayed = schedule_steps(requests, scheduler.config, scheduler.limits,
                              scheduler.block_manager.num_blocks)
    assert [sorted(n for _, n in step) for step in replayed] == steps


def test_roofline_sums_the_bound_of_each_step():
    model, config = meta_model(TINY, torch.bfloat16)
    cost = StepCostModel.from_model(model, config, torch.bfloat16)
    requests = _requests([(30, 4), (6, 9)])
    scheduler_config = SchedulerConfig(max_num_batched_tokens=16)
    model_limits = ModelLimits(max_model_len=64, vocab_size=512, block_size=4)
    limits = {"copy_bandwidth_gbps": 2.0, "bf16_matmul_tflops": 0.001}
    result = workload_roofline(requests, scheduler_config, model_limits, 64, cost, limits)
    steps = schedule_steps(requests, scheduler_config, model_limits, 64)
    expected = sum(max(cost.step_cost(s)[0] / 2e9, cost.step_cost(s)[1] / 1e9)
                   for s in steps)
    assert result["num_steps"] == len(steps)
    assert result["roofline_s"] == pytest.approx(expected)
    assert result["roofline_output_tokens_per_s"] == pytest.approx(13 / expected)
    no_limits = workload_roofline(requests, scheduler_config, model_limits, 64, cost,
                                  {"copy_bandwidth_gbps": None})
    assert no_limits["roofline_s"] is None and no_limits["num_steps"] == len(steps)


def test_throughput_table_shows_the_roofline_and_the_fraction():
    result = {"config": {"model": TINY},
              "machine": {"device": "gpu", "cpu_cores": 8, "date_utc": "now"},
              "gridllm": {"backend": "gridllm", "num_requests": 2, "elapsed_s": 4.0,
                          "requests_per_s": 0.5, "output_tokens_per_s": 25.0,
                          "total_tokens_per_s": 30.0, "roofline_fraction": 0.25},
              "roofline": {"roofline_output_tokens_per_s": 100.0, "roofline_s": 1.0,
                           "num_steps": 7, "copy_bandwidth_gbps": 4000.0,
                           "bf16_matmul_tflops": 800.0}}
    text = format_result(result)
    assert "roofline tok/s" in text and "of roofline" in text
    assert "100.00" in text and "0.25" in text and "7 steps" in text


def test_step_cost_counts_fp8_weights_and_kv_cache():
    """FP8 weights are read as 1 byte (plus a float32 scale per output channel) and an FP8
    KV cache holds 1 byte per element; the FLOPs do not change."""
    from worker_svc.layers.quantization import quantize_weights

    model, config = meta_model(TINY, torch.bfloat16)
    plain = StepCostModel.from_model(model, config, torch.bfloat16)
    linear_bytes = plain.linear_flops_per_token  # 2 bytes per weight = 2 FLOPs per weight
    quantize_weights(model, "fp8")
    fp8 = StepCostModel.from_model(model, config, torch.bfloat16, torch.float8_e4m3fn)
    assert fp8.linear_flops_per_token == plain.linear_flops_per_token
    assert fp8.kv_bytes_per_token * 2 == plain.kv_bytes_per_token
    scale_bytes = 4 * sum(m.weight.shape[0] for m in model.modules()
                          if type(m).__name__ == "Fp8Linear")
    assert fp8.weight_bytes == plain.weight_bytes - linear_bytes // 2 + scale_bytes
