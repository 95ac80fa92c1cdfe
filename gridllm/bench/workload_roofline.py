"""The roofline of a whole benchmark workload, step by step.

The scheduler is replayed on the workload with a runner that computes nothing (the same
budgets and KV pool as the engine, one step in flight, so no wasted slot counts). Each step
costs ``max(bytes moved / copy bandwidth, FLOPs / matmul peak)``: the step reads every
weight once and each request's cached K/V once and writes the new tokens' K/V; its FLOPs
are the linear layers over every token, attention over every (query, key) pair and the LM
head over one row per request. The sum over steps is the fastest the hardware could run
the workload; measured time over it is the fraction reached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gridllm.bench.datasets import BenchRequest
from gridllm.common.config import SchedulerConfig
from gridllm.common.contract import ModelLimits, ModelRunnerOutput, SchedulerOutput
from gridllm.common.sampling_params import SamplingParams


@dataclass(frozen=True)
class StepCostModel:
    """Bytes and FLOPs of one engine step of a model, from its geometry."""

    # Parameters read once per step.
    weight_bytes: int
    # K and V of one token over all layers.
    kv_bytes_per_token: int
    # 2 x the linear layers' weights (the LM head apart), per computed token.
    linear_flops_per_token: int
    # 2 x the LM head's weights, per request (logits of its last token only).
    lm_head_flops_per_request: int
    # QK^T and PV over all layers and heads, per (query, key) pair.
    attention_flops_per_pair: int

    @classmethod
    def from_model(cls, model: nn.Module, hf_config: Any, dtype: torch.dtype,
                   kv_cache_dtype: torch.dtype | None = None) -> StepCostModel:
        """Args:
            model: the gridllm model (a meta-device build is enough; quantized layers
                count their stored bytes).
            hf_config: its HF config (layers, heads, head_dim).
            dtype: the activation dtype.
            kv_cache_dtype: the KV cache's element type (default: ``dtype``).
        """
        from gridllm.bench.roofline import decode_weight_bytes

        num_layers = hf_config.num_hidden_layers
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        element = torch.empty((), dtype=kv_cache_dtype or dtype).element_size()
        head = getattr(model, "lm_head", None)
        # Linear layers, quantized ones (Fp8Linear) included: those with in_features.
        linear = sum(m.weight.numel() for m in model.modules()
                     if getattr(m, "in_features", None) is not None and m is not head)
        return cls(weight_bytes=decode_weight_bytes(model),
                   kv_bytes_per_token=2 * num_layers * num_kv_heads * head_dim * element,
                   linear_flops_per_token=2 * linear,
                   lm_head_flops_per_request=2 * head.weight.numel() if head is not None else 0,
                   attention_flops_per_pair=4 * num_layers * num_heads * head_dim)

    def step_cost(self, chunks: Sequence[tuple[int, int]]) -> tuple[float, float]:
        """``(bytes, flops)`` of a step that computes, per request, ``n`` tokens after
        ``start`` cached ones (``chunks`` of ``(start, n)``)."""
        num_bytes = float(self.weight_bytes)
        flops = 0.0
        for start, n in chunks:
            num_bytes += (start + n) * self.kv_bytes_per_token
            # Causal: query i of the chunk sees start + i + 1 keys.
            pairs = n * start + n * (n + 1) // 2
            flops += (n * self.linear_flops_per_token + self.lm_head_flops_per_request
                      + pairs * self.attention_flops_per_pair)
        return num_bytes, flops


def schedule_steps(requests: Sequence[BenchRequest], scheduler_config: SchedulerConfig,
                   model_limits: ModelLimits, num_kv_blocks: int, max_steps: int = 10_000_000
                   ) -> list[list[tuple[int, int]]]:
    """The steps the scheduler forms for ``requests`` (greedy, ``ignore_eos``,
    ``max_tokens = output_len``), each as its ``(start, num_tokens)`` chunks."""
    from scheduler_svc.request import Request
    from scheduler_svc.scheduler import Scheduler

    scheduler = Scheduler(scheduler_config, model_limits, num_kv_blocks)
    for i, r in enumerate(requests):
        params = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
        scheduler.add_request(Request(f"r{i}", list(r.prompt_token_ids), params,
                                      arrival_time=float(i)))
    steps: list[list[tuple[int, int]]] = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return steps
        output = scheduler.schedule()
        steps.append(_chunks(output))
        scheduler.update_from_output(output, _sample_all(scheduler, output))
    raise RuntimeError(f"the workload did not finish within {max_steps} steps.")


def _chunks(output: SchedulerOutput) -> list[tuple[int, int]]:
    starts = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs}
    starts.update({r.req_id: r.num_computed_tokens for r in output.scheduled_cached_reqs})
    return [(starts[req_id], n) for req_id, n in output.num_scheduled_tokens.items()]


def _sample_all(scheduler: Any, output: SchedulerOutput) -> ModelRunnerOutput:
    # Token 0 for every request whose chunk reached its end, i.e. that awaits a sample (the
    # ids do not change the schedule of random prompts, whose outputs share no prefix).
    result = ModelRunnerOutput()
    for req_id in output.num_scheduled_tokens:
        request = scheduler.requests.get(req_id)
        if request is not None and request.num_output_placeholders:
            result.req_ids.append(req_id)
            result.sampled_token_ids[req_id] = [0]
    return result


def workload_roofline(requests: Sequence[BenchRequest], scheduler_config: SchedulerConfig,
                      model_limits: ModelLimits, num_kv_blocks: int, cost: StepCostModel,
                      limits: dict[str, Any]) -> dict[str, Any]:
    """The workload's roofline time under ``limits`` (``measure_limits``'s result).

    Returns:
        ``num_steps``, total ``bytes`` and ``flops``, and ``roofline_s`` with
        ``roofline_output_tokens_per_s`` (None without measured limits).
    """
    bandwidth = limits.get("copy_bandwidth_gbps")
    peak = limits.get("bf16_matmul_tflops")
    steps = schedule_steps(requests, scheduler_config, model_limits, num_kv_blocks)
    total_bytes = total_flops = 0.0
    seconds: float | None = 0.0 if bandwidth and peak else None
    for chunks in steps:
        num_bytes, flops = cost.step_cost(chunks)
        total_bytes += num_bytes
        total_flops += flops
        if seconds is not None and bandwidth and peak:
            seconds += max(num_bytes / (bandwidth * 1e9), flops / (peak * 1e12))
    output_tokens = sum(r.output_len for r in requests)
    return {"num_steps": len(steps), "bytes": total_bytes, "flops": total_flops,
            "roofline_s": seconds,
            "roofline_output_tokens_per_s": output_tokens / seconds if seconds else None}
