"""``gridllm bench throughput``: offline throughput of the in-process engine (``gridllm.LLM``)
on a random dataset, optionally next to transformers ``generate`` on the same prompts."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from gridllm.bench.datasets import BenchRequest, parse_range, random_requests, special_token_ids
from gridllm.bench.report import format_table, machine_info, write_json
from gridllm.common.cli_args import size_type
from gridllm.common.config import KV_CACHE_DTYPES, QUANTIZATIONS

logger = logging.getLogger(__name__)


@dataclass
class ThroughputConfig:
    """What ``bench throughput`` runs; fields mirror the CLI flags."""

    model: str
    num_prompts: int = 256
    # Inclusive (low, high) prompt and completion lengths in tokens.
    input_len_range: tuple[int, int] = (100, 1024)
    output_len_range: tuple[int, int] = (100, 1024)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    # None (gridllm only) or "hf" (also transformers generate on the same prompts).
    compare: str | None = None
    # Rows per transformers static batch; None: max_num_seqs.
    hf_batch_size: int | None = None
    max_model_len: int | None = None
    enforce_eager: bool = False
    # CPU KV-cache bytes (None: the engine's default); GPU share (weights + KV + activations).
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    # Weight quantization (None or "fp8") and KV cache element type ("auto" or "fp8").
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    # Tokens per KV block (on Hopper, 32+ lets prefill attention read the cache by TMA).
    block_size: int = 16
    # Off for repeated runs of the same prompts (a second run would hit the prefix cache).
    enable_prefix_caching: bool = True
    # Short requests run first so one-time compilation is not timed.
    is_warmup: bool = True
    # On CUDA: measure the card's limits and report the workload's roofline next to tok/s.
    roofline: bool = True
    # The engine's step overlap (1 or 2); None: its default (2 on CUDA, 1 on the CPU).
    max_steps_in_flight: int | None = None
    # GPUs the model is sharded over (the roofline then has that many cards).
    tensor_parallel_size: int = 1
    use_tqdm: bool = True

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be at least 1, got {self.num_prompts}.")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, "
                             f"got {self.tensor_parallel_size}.")
        if self.compare not in (None, "hf"):
            raise ValueError(f"compare must be 'hf' or unset, got {self.compare!r}.")
        if self.max_steps_in_flight not in (None, 1, 2):
            raise ValueError(f"max_steps_in_flight must be 1 or 2, "
                             f"got {self.max_steps_in_flight}.")
        if self.hf_batch_size is not None and self.hf_batch_size < 1:
            raise ValueError(f"hf_batch_size must be at least 1, got {self.hf_batch_size}.")


def build_llm(config: ThroughputConfig, max_num_seqs: int | None = None):
    """The ``gridllm.LLM`` of a benchmark config (random presets have no tokenizer)."""
    from gridllm.common.random_presets import is_random_model
    from gridllm.llm import LLM

    kwargs: dict[str, Any] = {"gpu_memory_utilization": config.gpu_memory_utilization,
                              "enforce_eager": config.enforce_eager,
                              "tensor_parallel_size": config.tensor_parallel_size,
                              "quantization": config.quantization,
                              "kv_cache_dtype": config.kv_cache_dtype,
                              "block_size": config.block_size}
    if config.kv_cache_memory is not None:
        kwargs["kv_cache_memory"] = config.kv_cache_memory
    return LLM(config.model, skip_tokenizer_init=is_random_model(config.model),
               dtype=config.dtype, device=config.device, max_model_len=config.max_model_len,
               max_num_seqs=max_num_seqs or config.max_num_seqs,
               max_num_batched_tokens=config.max_num_batched_tokens, seed=config.seed,
               enable_prefix_caching=config.enable_prefix_caching, **kwargs)


def dataset_for(config: ThroughputConfig, vocab_size: int, excluded: list[int]
                ) -> list[BenchRequest]:
    return random_requests(config.num_prompts, config.input_len_range, config.output_len_range,
                           vocab_size, seed=config.seed, excluded_token_ids=excluded)


def run_gridllm(llm, requests: list[BenchRequest], use_tqdm: bool = True,
                is_warmup: bool = True) -> dict[str, Any]:
    """Time ``llm.generate`` over ``requests`` (greedy, ``ignore_eos``, max_tokens=output_len).

    Returns:
        Elapsed time, token totals (output tokens counted from what came back) and rates.
    """
    from gridllm.common.sampling_params import SamplingParams

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    if is_warmup:
        warm_up(llm, requests)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    sampling = [params(r.output_len) for r in requests]
    _synchronize(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling, use_tqdm=use_tqdm)
    _synchronize(llm)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    input_tokens = sum(r.input_len for r in requests)
    expected = sum(r.output_len for r in requests)
    if output_tokens != expected:
        logger.warning("gridllm returned %d output tokens, %d were asked for", output_tokens,
                       expected)
    return {
        "backend": "gridllm",
        "num_requests": len(outputs),
        "elapsed_s": elapsed,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "requests_per_s": len(outputs) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (input_tokens + output_tokens) / elapsed,
    }


def warm_up(llm, requests: list[BenchRequest]) -> None:
    """Four short greedy requests before a timed run: reversed prefixes of the first
    prompts, the same token ids but no prefix-cache hit for the timed run."""
    from gridllm.common.sampling_params import SamplingParams

    warm = requests[:4]
    llm.generate([{"prompt_token_ids": r.prompt_token_ids[:64][::-1]} for r in warm],
                 SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)


def _synchronize(llm) -> None:
    import torch

    device = llm.engine.runner.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_throughput(config: ThroughputConfig, llm: Any = None) -> dict[str, Any]:
    """Run the benchmark of ``config``; returns the result as a JSON-ready dict.

    With ``compare="hf"`` transformers runs first (its memory is released before gridllm
    sizes its KV cache from the free GPU memory), on the very same requests.

    Args:
        config: what to run.
        llm: an already built ``LLM`` to reuse (its settings then win over ``config``'s).
    """
    import torch

    from gridllm.bench.roofline import measure_limits
    from worker_svc.torch_utils import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    hf_config, tokenizer = model_config_and_tokenizer(config.model)
    requests = dataset_for(config, hf_config.vocab_size, special_token_ids(tokenizer, hf_config))
    result: dict[str, Any] = {"benchmark": "throughput", "machine": machine_info(config.device),
                              "config": _config_dict(config)}
    if config.compare == "hf":
        from gridllm.bench.hf import run_hf

        hf_batch = config.hf_batch_size or config.max_num_seqs
        result["hf"] = run_hf(config.model, requests, hf_batch, dtype, device, seed=config.seed,
                              use_tqdm=config.use_tqdm)
        gc.collect()
    owns_llm = llm is None
    limits = None
    if config.roofline and device.type == "cuda" and owns_llm:
        limits = measure_limits(device)  # before the KV cache takes the free memory
    if owns_llm:
        llm = build_llm(config)
    if config.max_steps_in_flight is not None:
        llm.engine.max_steps_in_flight = config.max_steps_in_flight
    result["gridllm"] = run_gridllm(llm, requests, config.use_tqdm, config.is_warmup)
    if config.roofline and device.type == "cuda":
        result["roofline"] = _workload_roofline(config, llm, requests, dtype, limits)
        seconds = result["roofline"]["roofline_s"]
        result["gridllm"]["roofline_fraction"] = (
            seconds / result["gridllm"]["elapsed_s"] if seconds else None)
    if owns_llm:
        llm.shutdown()  # the other tensor-parallel ranks, if any
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "hf" in result:
        result["speedup_vs_hf"] = (result["gridllm"]["output_tokens_per_s"]
                                   / result["hf"]["output_tokens_per_s"])
    return result


def _workload_roofline(config: ThroughputConfig, llm: Any, requests: list[BenchRequest],
                       dtype: Any, limits: dict[str, Any] | None) -> dict[str, Any]:
    """The roofline of the very schedule the engine ran (its budgets and KV pool)."""
    import torch

    from gridllm.bench.roofline import measure_limits, meta_model
    from gridllm.bench.workload_roofline import StepCostModel, workload_roofline
    if limits is None:
        try:
            limits = measure_limits(llm.engine.runner.device)
        except torch.cuda.OutOfMemoryError:
            limits = {"device": "cuda", "copy_bandwidth_gbps": None,
                      "bf16_matmul_tflops": None}
    # FP8 weights (the flag, or an FP8 checkpoint): 1 byte per parameter read.
    model, hf_config = meta_model(config.model, dtype, config.quantization)
    scheduler = llm.engine.scheduler
    # Sharded over T cards, each step's bytes and FLOPs split across them.
    num_gpus = config.tensor_parallel_size
    cards = {k: v * num_gpus if v else v for k, v in limits.items()
             if k in ("copy_bandwidth_gbps", "bf16_matmul_tflops")}
    return {**limits, "num_gpus": num_gpus,
            **workload_roofline(requests, scheduler.config, scheduler.limits,
                                scheduler.block_manager.num_blocks,
                                StepCostModel.from_model(model, hf_config, dtype,
                                                         llm.engine.runner.kv_cache_dtype),
                                {**limits, **cards})}


def model_config_and_tokenizer(model: str) -> tuple[Any, Any]:
    """``(hf_config, tokenizer or None)`` of a model name, without loading weights."""
    import os

    from transformers import AutoConfig

    from gridllm.common.random_presets import is_random_model, random_model_config
    from gridllm.common.tokenizer import load_tokenizer
    from worker_svc.loader import resolve_model_path

    if is_random_model(model):
        return random_model_config(model), None

    path = resolve_model_path(model)
    if not os.path.isdir(path):
        raise ValueError(f"bench throughput needs an HF directory, a preset or random:<preset>; "
                         f"got {model!r}.")
    return AutoConfig.from_pretrained(path), load_tokenizer(path)


def _config_dict(config: ThroughputConfig) -> dict[str, Any]:
    data = asdict(config)
    data["input_len_range"] = list(config.input_len_range)
    data["output_len_range"] = list(config.output_len_range)
    data.pop("use_tqdm")
    return data


def format_result(result: dict[str, Any]) -> str:
    """The printed table of a throughput result."""
    rows = []
    roofline = result.get("roofline") or {}
    for key in ("gridllm", "hf"):
        if key in result:
            r = result[key]
            rows.append([r["backend"], r["num_requests"], r["elapsed_s"], r["requests_per_s"],
                         r["output_tokens_per_s"], r["total_tokens_per_s"],
                         roofline.get("roofline_output_tokens_per_s"),
                         r.get("roofline_fraction")])
    machine = result["machine"]
    config = result["config"]
    text = (f"model {config['model']} on {machine['device']} "
            f"({machine['cpu_cores']} CPU cores), {machine['date_utc']} UTC; "
            f"quantization {config.get('quantization') or 'none'}, "
            f"kv_cache_dtype {config.get('kv_cache_dtype', 'auto')}\n")
    text += format_table(rows, ["backend", "requests", "seconds", "req/s", "output tok/s",
                                "total tok/s", "roofline tok/s", "of roofline"])
    if roofline.get("roofline_s"):
        cards = roofline.get("num_gpus", 1)
        per = f"{cards} x " if cards > 1 else ""
        text += (f"\nroofline: {roofline['num_steps']} steps, each max(bytes / "
                 f"{per}{roofline['copy_bandwidth_gbps']:,.0f} GB/s, FLOPs / "
                 f"{per}{roofline['bf16_matmul_tflops']:,.0f} TFLOP/s), sum "
                 f"{roofline['roofline_s']:.2f} s")
    if "speedup_vs_hf" in result:
        text += f"\ngridllm / transformers (output tok/s): {result['speedup_vs_hf']:.2f}x"
    return text


# ------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="preset (smollm2-135m), random:<preset>, HF directory")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len-range", default="100:1024", help="LOW:HIGH prompt tokens")
    p.add_argument("--output-len-range", default="100:1024", help="LOW:HIGH generated tokens")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", default=None, choices=("hf",),
                   help="also run transformers generate on the same prompts")
    p.add_argument("--hf-batch-size", type=int, default=None,
                   help="rows per transformers static batch (default: --max-num-seqs)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--kv-cache-memory", type=size_type("kv_cache_memory"), default=None,
                   metavar="SIZE", help="CPU KV-cache size, e.g. 1GiB (default: the engine's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="weight quantization of gridllm (default: none)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="gridllm's KV cache element type (auto: the model's dtype)")
    p.add_argument("--block-size", type=int, default=16,
                   help="tokens per KV block (a power of two; on Hopper, 32 or more lets "
                   "prefill attention read the cache by TMA)")
    p.add_argument("--no-warmup", dest="is_warmup", action="store_false")
    p.add_argument("--max-steps-in-flight", type=int, default=None, choices=(1, 2),
                   help="engine step overlap (default: 2 on CUDA, 1 on the CPU)")
    p.add_argument("--no-roofline", dest="roofline", action="store_false",
                   help="skip measuring the card's limits and the workload's roofline")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs the model is sharded over, one process each")
    p.add_argument("--no-tqdm", dest="use_tqdm", action="store_false")
    p.add_argument("--output", default=None, help="write the result as JSON here")


def config_from_args(args: argparse.Namespace) -> ThroughputConfig:
    return ThroughputConfig(
        model=args.model, num_prompts=args.num_prompts,
        input_len_range=parse_range(args.input_len_range, "--input-len-range"),
        output_len_range=parse_range(args.output_len_range, "--output-len-range"),
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        dtype=args.dtype, device=args.device, seed=args.seed, compare=args.compare,
        hf_batch_size=args.hf_batch_size, max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size, is_warmup=args.is_warmup,
        roofline=args.roofline, max_steps_in_flight=args.max_steps_in_flight,
        tensor_parallel_size=args.tensor_parallel_size, use_tqdm=args.use_tqdm)


def cmd_throughput(args: argparse.Namespace) -> int:
    result = run_throughput(config_from_args(args))
    write_json(args.output, result)
    sys.stdout.write(format_result(result) + "\n")
    return 0
