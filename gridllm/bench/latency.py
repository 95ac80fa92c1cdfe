"""``gridllm bench latency``: one request at a time, decode tokens/s next to the roofline.

In-process (``--model``) it drives ``EngineCore`` step by step and timestamps each token;
through the stack (``--target HOST:PORT``) it streams one request after another. Decode
speed is ``1 / TPOT`` (time between the first and the last token over the tokens in
between), so prefill is not mixed into it; the roofline is
``gridllm.bench.roofline`` measured in the same process.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gridllm.bench.metrics import RequestRecord, compute_serve_metrics
from gridllm.bench.report import format_table, machine_info, write_json
from gridllm.common.config import KV_CACHE_DTYPES, QUANTIZATIONS

logger = logging.getLogger(__name__)


@dataclass
class LatencyConfig:
    """What ``bench latency`` runs; exactly one of ``model`` / ``target``."""

    model: str | None = None
    target: str | None = None
    input_len: int = 128
    output_len: int = 128
    num_iters: int = 5
    num_warmup: int = 1
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    enforce_eager: bool = False
    # GPUs the model is sharded over (in-process: the engine's; through the stack: the
    # workers', for the roofline).
    tensor_parallel_size: int = 1
    # In-process only: weight quantization (None or "fp8") and KV cache element type.
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    use_tqdm: bool = True
    # The router's API key (None: $GRIDLLM_API_KEY, or none); never written to results.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.model is None) == (self.target is None):
            raise ValueError("pass exactly one of model (in-process) or target (HOST:PORT).")
        for name in ("input_len", "output_len", "num_iters", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.num_warmup < 0:
            raise ValueError(f"num_warmup must be at least 0, got {self.num_warmup}.")


def _prompts(config: LatencyConfig, vocab_size: int, excluded: list[int]) -> list[list[int]]:
    from gridllm.bench.datasets import random_requests

    count = config.num_iters + config.num_warmup
    length = (config.input_len, config.input_len)
    # Distinct prompts, so no iteration is served from the prefix cache of another.
    return [r.prompt_token_ids for r in random_requests(
        count, length, (1, 1), vocab_size, seed=config.seed, excluded_token_ids=excluded)]


def _time_engine_request(engine, req_id: str, prompt: list[int], output_len: int
                         ) -> RequestRecord:
    import torch

    from gridllm.common.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    record = RequestRecord(len(prompt), output_len, time.perf_counter())
    engine.add_request(engine.make_request(req_id, prompt, params))
    while engine.has_unfinished_requests():
        updates = engine.step()
        # Sampled ids come back as Python ints, so the step's GPU work is done here.
        now = time.perf_counter()
        for update in updates:
            if update.new_token_ids:
                record.chunk_times.append(now)
                record.chunk_num_tokens.append(len(update.new_token_ids))
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize(engine.runner.device)
    record.end_time = time.perf_counter()
    return record


def run_inprocess(config: LatencyConfig) -> tuple[list[RequestRecord], Any, int]:
    """Returns ``(records, device, decode weight bytes)`` of an in-process run."""
    from tqdm.auto import tqdm

    from gridllm.bench.datasets import special_token_ids
    from gridllm.bench.roofline import decode_weight_bytes, model_decode_weight_bytes
    from gridllm.bench.throughput import ThroughputConfig, build_llm

    assert config.model is not None
    llm = build_llm(ThroughputConfig(model=config.model, max_num_seqs=1, dtype=config.dtype,
                                     device=config.device, seed=config.seed,
                                     enforce_eager=config.enforce_eager,
                                     gpu_memory_utilization=0.9,
                                     tensor_parallel_size=config.tensor_parallel_size,
                                     quantization=config.quantization,
                                     kv_cache_dtype=config.kv_cache_dtype))
    engine = llm.engine
    prompts = _prompts(config, engine.vocab_size,
                       special_token_ids(llm.tokenizer, engine.runner.hf_config))
    records = []
    for i, prompt in enumerate(tqdm(prompts, desc="latency (requests)",
                                    disable=not config.use_tqdm, dynamic_ncols=True)):
        record = _time_engine_request(engine, f"latency-{i}", prompt, config.output_len)
        if i >= config.num_warmup:
            records.append(record)
    device = engine.runner.device
    if config.tensor_parallel_size == 1:
        weight_bytes = decode_weight_bytes(engine.runner.model)
    else:  # this process holds one shard: count the whole model
        weight_bytes = model_decode_weight_bytes(config.model, engine.runner.dtype,
                                                 config.quantization)
    llm.shutdown()
    del llm, engine
    gc.collect()
    return records, device, weight_bytes


def run_remote(config: LatencyConfig) -> tuple[list[RequestRecord], str]:
    """Returns ``(records, served model name)`` of a run through the router."""
    from tqdm.auto import tqdm

    from gridllm.client import Client
    from gridllm.common.sampling_params import SamplingParams

    assert config.target is not None
    records = []
    with Client(config.target, api_key=config.api_key) as client:
        info = client.model_info()
        excluded = [] if info.eos_token_id is None else [info.eos_token_id]
        prompts = _prompts(config, info.vocab_size, excluded)
        params = SamplingParams(temperature=0.0, max_tokens=config.output_len, ignore_eos=True)
        for i, prompt in enumerate(tqdm(prompts, desc="latency (requests)",
                                        disable=not config.use_tqdm, dynamic_ncols=True)):
            record = RequestRecord(len(prompt), config.output_len, time.perf_counter())
            for chunk in client.generate_stream(sampling_params=params, prompt_token_ids=prompt,
                                                return_token_ids=True):
                if chunk.token_ids:
                    record.chunk_times.append(time.perf_counter())
                    record.chunk_num_tokens.append(len(chunk.token_ids))
            record.end_time = time.perf_counter()
            if i >= config.num_warmup:
                records.append(record)
    return records, info.model


def run_latency(config: LatencyConfig) -> dict[str, Any]:
    """Run the latency benchmark; returns a JSON-ready dict with the roofline next to it."""
    import torch

    from gridllm.bench.roofline import measure_limits, model_decode_weight_bytes, roofline
    from worker_svc.torch_utils import resolve_device, resolve_dtype

    if config.model is not None:
        records, device, weight_bytes = run_inprocess(config)
        model = config.model
    else:
        records, model = run_remote(config)
        # The roofline is measured here; meaningful when this process sees the server's GPU.
        device = resolve_device(config.device)
        weight_bytes = model_decode_weight_bytes(model, resolve_dtype(config.dtype, device),
                                                 config.quantization)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    limits = roofline(weight_bytes, measure_limits(device), config.tensor_parallel_size)
    duration = sum((r.end_time or r.send_time) - r.send_time for r in records)
    metrics = compute_serve_metrics(records, duration)
    tpots = [(r.chunk_times[-1] - r.chunk_times[0]) / (r.num_output_tokens - 1)
             for r in records if r.is_success and r.num_output_tokens > 1]
    decode_tps = float(1.0 / np.median(tpots)) if tpots else None
    config_dict = asdict(config)
    config_dict.pop("use_tqdm")
    config_dict.pop("api_key")
    result = {"benchmark": "latency", "model": model, "mode": "in-process"
              if config.model else "stack", "machine": machine_info(device.type),
              "config": config_dict, "roofline": limits,
              "decode_tokens_per_s": decode_tps,
              "fraction_of_roofline": (decode_tps / limits["roofline_tokens_per_s"]
                                       if decode_tps and limits["roofline_tokens_per_s"]
                                       else None),
              **{k: metrics[k] for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms")}}
    return result


def format_result(result: dict[str, Any]) -> str:
    roof = result["roofline"]
    rows = [["decode tokens/s (1/median TPOT)", result["decode_tokens_per_s"]],
            [f"roofline tokens/s ({roof['num_gpus']} x copy bandwidth / weights)",
             roof["roofline_tokens_per_s"]],
            ["fraction of roofline", result["fraction_of_roofline"]],
            ["TTFT mean (ms)", result["ttft_ms"]["mean"]],
            ["TPOT mean (ms)", result["tpot_ms"]["mean"]],
            ["E2E mean / p99 (ms)", f"{result['e2e_latency_ms']['mean']:.1f} / "
                                    f"{result['e2e_latency_ms']['p99']:.1f}"],
            ["decode weight bytes (GB)", roof["weight_bytes"] / 1e9],
            ["copy bandwidth (GB/s)", roof["copy_bandwidth_gbps"]],
            ["bf16 matmul (TFLOP/s)", roof["bf16_matmul_tflops"]]]
    return (f"model {result['model']} ({result['mode']}) on {roof['device']}, batch 1, "
            f"{result['config']['input_len']} in / {result['config']['output_len']} out\n"
            + format_table(rows, ["metric", "value"]))


# ------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="in-process: preset, random:<preset>, HF dir")
    p.add_argument("--target", default=None, help="through the stack: router HOST:PORT")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=5)
    p.add_argument("--num-warmup", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="in-process: weight quantization (default: none; the roofline "
                   "counts the quantized bytes)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="in-process: KV cache element type (auto: the model's dtype)")
    p.add_argument("--api-key", default=None,
                   help="API key sent as `Authorization: Bearer KEY` (default: $GRIDLLM_API_KEY)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs the model is sharded over (with --target: the workers'; sets "
                        "the roofline)")
    p.add_argument("--no-tqdm", dest="use_tqdm", action="store_false")
    p.add_argument("--output", default=None, help="write the result as JSON here")


def cmd_latency(args: argparse.Namespace) -> int:
    config = LatencyConfig(model=args.model, target=args.target, input_len=args.input_len,
                           output_len=args.output_len, num_iters=args.num_iters,
                           num_warmup=args.num_warmup, dtype=args.dtype, device=args.device,
                           seed=args.seed, enforce_eager=args.enforce_eager,
                           tensor_parallel_size=args.tensor_parallel_size,
                           quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                           use_tqdm=args.use_tqdm, api_key=args.api_key)
    result = run_latency(config)
    write_json(args.output, result)
    sys.stdout.write(format_result(result) + "\n")
    return 0
