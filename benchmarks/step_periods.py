"""Where a throughput run's wall time goes, step by step: the period from one engine step to
the next, the host's share of it (scheduling, inputs, launches) against the wait for the
GPU's sampled ids, and the garbage collector's full collections, by step window.

    python benchmarks/step_periods.py --model random:llama3-8b [--quantization fp8]
        [--kv-cache-dtype fp8] [--num-prompts 256] [--input-len 100] [--output-len 1024]

A step that waits on ids is bound by the GPU; one that does not, by the host. A period far
above its neighbours that holds a full collection is the collector's pause.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass, field

# The repository's packages, not benchmarks/kernels.py, under the names they import.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from gridllm.bench.report import write_json  # noqa: E402
from gridllm.bench.throughput import ThroughputConfig, build_llm, warm_up  # noqa: E402
from gridllm.common.config import KV_CACHE_DTYPES  # noqa: E402
from gridllm.common.sampling_params import SamplingParams  # noqa: E402

WINDOWS = (0, 8, 64, 256, 512, 768, 1024)


@dataclass
class Timeline:
    """Per engine step: when it began, seconds in ``step()``, of which queuing steps on the
    runner (``launch_s``) and waiting for sampled ids (``wait_s``); full collections as
    ``(step index, seconds)``; objects frozen (``gc.get_freeze_count()``) at the first
    step."""

    starts: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    launch_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)
    full_collections: list[tuple[int, float]] = field(default_factory=list)
    frozen_objects: int | None = None


def observe(llm, timeline: Timeline):
    """Wrap the engine's ``step`` and the runner's launches to fill ``timeline``; returns
    a function that removes the wrappers."""
    engine, runner = llm.engine, llm.engine.runner
    launch = runner.execute_model_async
    step = engine.step
    current = {"launch": 0.0, "wait": 0.0}

    def timed_launch(scheduler_output):
        start = time.perf_counter()
        handle = launch(scheduler_output)
        current["launch"] += time.perf_counter() - start
        get_output = handle.get_output

        def timed_get_output():
            start = time.perf_counter()
            output = get_output()
            current["wait"] += time.perf_counter() - start
            return output

        handle.get_output = timed_get_output
        return handle

    def timed_step():
        current["launch"] = current["wait"] = 0.0
        if timeline.frozen_objects is None:
            timeline.frozen_objects = gc.get_freeze_count()
        start = time.perf_counter()
        updates = step()
        timeline.starts.append(start)
        timeline.step_s.append(time.perf_counter() - start)
        timeline.launch_s.append(current["launch"])
        timeline.wait_s.append(current["wait"])
        return updates

    collection_start = [0.0]

    def on_collection(phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            collection_start[0] = time.perf_counter()
        else:
            timeline.full_collections.append(
                (len(timeline.starts), time.perf_counter() - collection_start[0]))

    runner.execute_model_async = timed_launch
    engine.step = timed_step
    gc.callbacks.append(on_collection)

    def remove() -> None:
        gc.callbacks.remove(on_collection)
        del runner.execute_model_async, engine.step

    return remove


def summarize(timeline: Timeline, elapsed_s: float, num_tokens: int) -> dict:
    periods = [b - a for a, b in zip(timeline.starts, timeline.starts[1:], strict=False)]
    windows = []
    bounds = [w for w in WINDOWS if w < len(periods)] + [len(periods)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        n = hi - lo
        windows.append({"steps": f"{lo}-{hi}",
                        "period_ms": 1e3 * sum(periods[lo:hi]) / n,
                        "max_period_ms": 1e3 * max(periods[lo:hi]),
                        "launch_ms": 1e3 * sum(timeline.launch_s[lo:hi]) / n,
                        "wait_ms": 1e3 * sum(timeline.wait_s[lo:hi]) / n})
    slowest = sorted(range(len(periods)), key=lambda i: -periods[i])[:8]
    return {"elapsed_s": elapsed_s, "output_tokens_per_s": num_tokens / elapsed_s,
            "steps": len(timeline.starts), "windows": windows,
            "slowest_periods_ms": {i: 1e3 * periods[i] for i in slowest},
            "full_collections_ms": [(i, 1e3 * s) for i, s in timeline.full_collections],
            "frozen_objects": timeline.frozen_objects}


def run(config: ThroughputConfig, num_prompts: int, input_len: int, output_len: int) -> dict:
    from gridllm.bench.datasets import random_requests
    from gridllm.bench.throughput import model_config_and_tokenizer

    llm = build_llm(config)
    hf_config, _ = model_config_and_tokenizer(config.model)
    requests = random_requests(num_prompts, (input_len, input_len), (output_len, output_len),
                               hf_config.vocab_size, seed=config.seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    warm_up(llm, requests)
    timeline = Timeline()
    remove = observe(llm, timeline)
    try:
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests],
                               params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        remove()
    num_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"model": config.model, "quantization": config.quantization,
            "kv_cache_dtype": config.kv_cache_dtype, "num_prompts": num_prompts,
            "input_len": input_len, "output_len": output_len,
            **summarize(timeline, elapsed, num_tokens)}


def format_result(result: dict) -> str:
    lines = [f"{result['model']} quantization={result['quantization']} "
             f"kv_cache_dtype={result['kv_cache_dtype']}: "
             f"{result['output_tokens_per_s']:,.0f} out tok/s, {result['elapsed_s']:.2f} s, "
             f"{result['steps']} steps",
             "| steps | period ms | max ms | host launches ms | waiting on ids ms |",
             "|---|---|---|---|---|"]
    lines += [f"| {w['steps']} | {w['period_ms']:.2f} | {w['max_period_ms']:.1f} | "
              f"{w['launch_ms']:.2f} | {w['wait_ms']:.2f} |" for w in result["windows"]]
    pauses = ", ".join(f"step {i}: {ms:.1f}" for i, ms in result["full_collections_ms"])
    lines.append(f"full collections (ms): {pauses or 'none'}; objects frozen during the steps: "
                 f"{result['frozen_objects']:,}")
    slowest = ", ".join(f"step {i}: {ms:.1f}" for i, ms in result["slowest_periods_ms"].items())
    lines.append(f"slowest periods (ms): {slowest}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--device", default="auto")
    p.add_argument("--quantization", default=None, choices=("fp8",))
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    p.add_argument("--output", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    config = ThroughputConfig(model=args.model, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              device=args.device, quantization=args.quantization,
                              kv_cache_dtype=args.kv_cache_dtype)
    result = run(config, args.num_prompts, args.input_len, args.output_len)
    print(format_result(result))
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
