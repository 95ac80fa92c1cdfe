"""Does the GPU idle between steps? A torch-profiler look at a few decode steps.

    python -m gridllm.bench.gpu_busy --model random:llama3-8b --batch-size 1

``--prompt-chunk N`` looks at prompt steps instead: ``--batch-size`` prompts of
``--input-len`` tokens computed N tokens a step (chunked prefill), each measured phase on
fresh prompts.

Runs a short greedy generation in-process under ``torch.profiler`` and reports, over the
decode part, the fraction of wall time during which at least one GPU kernel ran (the union
of kernel intervals), milliseconds per step, and the kernels taking the most time; the same
number of steps just before, without the profiler (whose own host work slows each step),
gives ``ms_per_step_unprofiled`` and the kernels' share of it.
``--trace FILE`` also writes the Chrome trace.

With programmatic dependent launch (on Hopper by default; ``GRIDLLM_LAUNCH_DEPENDENT=0``
turns it off) a kernel starts before the previous one ends and waits: the profiler counts
the wait as kernel time, so the busy fraction and the kernel sums overstate; the unprofiled
step time stays the measure (``launch_dependent`` in the output says which it was).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from gridllm.common.config import KV_CACHE_DTYPES


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _run_steps(engine, num_steps: int) -> float:
    """Seconds for ``num_steps`` engine steps, up to the last kernel's end."""
    start = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    _synchronize()
    return time.perf_counter() - start


class _CountTokens:
    """Within the block, the tokens of each step the engine launches, in order."""

    def __init__(self, runner) -> None:
        self.runner, self.tokens = runner, []

    def __enter__(self) -> list[int]:
        launch = self.runner.execute_model_async

        def counted(output):
            self.tokens.append(output.total_num_scheduled_tokens)
            return launch(output)

        self.runner.execute_model_async = counted
        return self.tokens

    def __exit__(self, *exc) -> None:
        del self.runner.execute_model_async


def busy_fraction(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Fraction of ``[start, end]`` covered by the union of ``intervals``."""
    if end <= start:
        raise ValueError(f"end must be after start, got {(start, end)}.")
    covered, cursor = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, cursor), min(b, end)
        if b > a:
            covered += b - a
            cursor = b
    return covered / (end - start)


def profile_decode(model: str, batch_size: int = 1, input_len: int = 128,
                   num_steps: int = 32, trace: str | None = None,
                   max_steps_in_flight: int | None = None, quantization: str | None = None,
                   kv_cache_dtype: str = "auto", host_profile: bool = False,
                   prompt_chunk: int | None = None, temperature: float = 0.0
                   ) -> dict[str, Any]:
    """Profile ``num_steps`` decode steps of ``batch_size`` requests (prefill excluded),
    with the engine's step overlap (``max_steps_in_flight``; None: its default), weights
    and KV cache as ``quantization`` / ``kv_cache_dtype`` say. ``host_profile``: then as many
    decode steps of a fresh batch under cProfile, the host functions taking the most time.
    ``prompt_chunk``: prompt steps of that many tokens instead (``max_num_batched_tokens``),
    the ``num_steps`` steps all within the prompts of ``batch_size`` fresh requests.
    ``temperature``: the measured requests' (0: greedy; else seeded draws, top-p 0.95).

    Returns:
        ``gpu_busy_fraction``, ``ms_per_step`` (wall), ``kernel_ms_per_step``, the top
        kernels by total time, and ``tokens_per_step`` of the unprofiled steps.
    """
    import torch
    import torch.profiler as tp

    if prompt_chunk is not None and (prompt_chunk < 1
                                     or batch_size * input_len < num_steps * prompt_chunk):
        raise ValueError(
            f"prompt_chunk must be >= 1 and num_steps * prompt_chunk at most batch_size * "
            f"input_len ({batch_size} * {input_len}), got prompt_chunk={prompt_chunk}, "
            f"num_steps={num_steps}.")
    # Prompt steps: each phase (warm-up, plain, profiled, host) on prompts of its own, so
    # none is served from the prefix cache.
    engine, batches, params = warm_engine(
        model, batch_size, input_len, 4 if prompt_chunk is not None else 2, num_steps,
        max_steps_in_flight, quantization, kv_cache_dtype, prompt_chunk, temperature)
    _add(engine, "profile", batches[0], params, prefill=prompt_chunk is None)
    # The same number of steps without the profiler, whose own host work slows the steps.
    with _CountTokens(engine.runner) as tokens:
        plain_s = _run_steps(engine, num_steps)
    if prompt_chunk is not None:
        _drain(engine)
        _add(engine, "traced", batches[2], params, prefill=False)
    with tp.profile(activities=[tp.ProfilerActivity.CPU, tp.ProfilerActivity.CUDA]) as prof:
        wall_s = _run_steps(engine, num_steps)
    _drain(engine)
    host = _host_profile(engine, batches[-1 if prompt_chunk is not None else 0], params,
                         num_steps, prefill=prompt_chunk is None) if host_profile else None
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
    result: dict[str, Any] = {"model": model, "batch_size": batch_size,
                              "input_len": input_len, "prompt_chunk": prompt_chunk,
                              "quantization": quantization, "kv_cache_dtype": kv_cache_dtype,
                              "temperature": temperature,
                              "max_steps_in_flight": engine.max_steps_in_flight,
                              "num_steps": num_steps, "ms_per_step": wall_s * 1e3 / num_steps,
                              "ms_per_step_unprofiled": plain_s * 1e3 / num_steps,
                              "tokens_per_step": tokens[:num_steps],
                              "launch_dependent":
                                  os.environ.get("GRIDLLM_LAUNCH_DEPENDENT", "1") != "0"}
    if intervals:
        span_start = min(a for a, _ in intervals)
        span_end = max(b for _, b in intervals)
        result["gpu_busy_fraction"] = busy_fraction(intervals, span_start, span_end)
        result["kernel_ms_per_step"] = sum(b - a for a, b in intervals) / 1e3 / num_steps
        # Kernel time over an unprofiled step: the busy fraction without the profiler's cost.
        result["kernel_share_unprofiled"] = min(
            1.0, result["kernel_ms_per_step"] / result["ms_per_step_unprofiled"])
        totals: dict[str, float] = {}
        for e in kernels:
            totals[e.name] = totals.get(e.name, 0.0) + (e.time_range.end - e.time_range.start)
        result["top_kernels_ms_per_step"] = {
            name[:160]: us / 1e3 / num_steps
            for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:16]}
    if host is not None:
        result["host_ms_per_step"] = host
    if trace:
        prof.export_chrome_trace(trace)
        result["trace"] = trace
    return result


def warm_engine(model: str, batch_size: int, input_len: int, phases: int, num_steps: int,
                max_steps_in_flight: int | None = None, quantization: str | None = None,
                kv_cache_dtype: str = "auto", prompt_chunk: int | None = None,
                temperature: float = 0.0):
    """An in-process engine for ``model`` whose kernels are compiled and graphs captured
    (a short generation over ``batch_size`` prompts of their own), ``phases`` batches of
    ``batch_size`` random ``input_len``-token prompts (batch 1 was the warm-up's; the others
    are fresh, so none is served from the prefix cache) and the sampling parameters of the
    measured requests: ``num_steps`` decode steps' worth of tokens, or one token where
    ``prompt_chunk`` (``max_num_batched_tokens``) makes them prompt steps; greedy, or
    seeded draws at ``temperature`` (top-p 0.95; the warm-up draws alike).

    Returns:
        ``(engine, batches, params)``.
    """
    from gridllm.bench.datasets import random_requests
    from gridllm.bench.throughput import ThroughputConfig, build_llm
    from gridllm.common.sampling_params import SamplingParams

    config = ThroughputConfig(model=model, max_num_seqs=max(batch_size, 1),
                              quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    if prompt_chunk is not None:
        config.max_num_batched_tokens = prompt_chunk
        config.max_model_len = input_len + 8
    llm = build_llm(config)
    engine = llm.engine
    if max_steps_in_flight is not None:
        engine.max_steps_in_flight = max_steps_in_flight
    requests = random_requests(phases * batch_size, (input_len, input_len), (1, 1),
                               engine.vocab_size, seed=0)
    batches = [requests[i * batch_size:(i + 1) * batch_size] for i in range(phases)]
    draws = dict(temperature=temperature, **(dict(top_p=0.95, seed=0) if temperature else {}))
    if prompt_chunk is not None:
        params = SamplingParams(max_tokens=1, ignore_eos=True, **draws)
    else:
        params = SamplingParams(max_tokens=2 * num_steps + 8, ignore_eos=True, **draws)
    # Warm-up pass: compilation and graph capture happen outside what is measured.
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in batches[1]],
                 SamplingParams(max_tokens=8, ignore_eos=True, **draws), use_tqdm=False)
    return engine, batches, params


def _add(engine, prefix: str, requests, params, *, prefill: bool) -> None:
    """Add ``requests``; with ``prefill``, step until their prompts are computed."""
    for i, r in enumerate(requests):
        engine.add_request(engine.make_request(f"{prefix}-{i}", r.prompt_token_ids, params))
    if prefill:
        _prefill(engine)
    _synchronize()


def _drain(engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def _prefill(engine) -> None:
    """Step until every request added has computed its prompt (a batch's prompts may take
    several chunked-prefill steps): what follows are decode steps only."""
    scheduler = engine.scheduler
    while any(r.num_computed_tokens < r.num_prompt_tokens
              for r in (*scheduler.waiting, *scheduler.running)):
        engine.step()


def _host_profile(engine, requests, params, num_steps: int, top: int = 30, *,
                  prefill: bool = True) -> dict[str, Any]:
    """Milliseconds per step of the host functions with the most own time (cProfile over
    ``num_steps`` steps of ``requests``: decode steps with ``prefill``, else their first
    steps, prompt steps where the prompts are long enough)."""
    import cProfile
    import pstats

    _add(engine, "host", requests, params, prefill=prefill)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(num_steps):
        engine.step()
    profiler.disable()
    _drain(engine)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    profile = {"(all functions, own time)": 1e3 * total / num_steps}

    def where(path: str, line: int, name: str, calls: int) -> str:
        return f"{'/'.join(path.split('/')[-2:])}:{line} {name} x{calls / num_steps:g}"

    for (path, line, name), (_, calls, own_s, _, _) in sorted(
            stats.items(), key=lambda kv: -kv[1][2])[:top]:
        profile[where(path, line, name, calls)] = 1e3 * own_s / num_steps
    # And with what they call: which parts of the step the host's time goes to.
    profile["(with callees)"] = {
        where(path, line, name, calls): 1e3 * cum_s / num_steps
        for (path, line, name), (_, calls, _, cum_s, _) in sorted(
            stats.items(), key=lambda kv: -kv[1][3])[:top]}
    return profile


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gridllm.bench.gpu_busy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--num-steps", type=int, default=32)
    p.add_argument("--max-steps-in-flight", type=int, default=None, choices=(1, 2),
                   help="2 overlaps step N+1 with reading step N (the default on CUDA)")
    p.add_argument("--quantization", default=None, choices=("fp8",),
                   help="weights in FP8 (e4m3, per-channel scales)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    p.add_argument("--trace", default=None, help="also write the Chrome trace here")
    p.add_argument("--host-profile", action="store_true",
                   help="also profile the host (cProfile) over as many steps of a fresh batch")
    p.add_argument("--prompt-chunk", type=int, default=None,
                   help="profile prompt steps of this many tokens instead of decode steps")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="the measured requests' temperature (0: greedy; else seeded draws "
                        "with top-p 0.95)")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    from gridllm.bench.report import machine_info, write_json
    from gridllm.common.logger import configure_logging

    configure_logging()
    result = profile_decode(args.model, args.batch_size, args.input_len, args.num_steps,
                            args.trace, args.max_steps_in_flight, args.quantization,
                            args.kv_cache_dtype, args.host_profile, args.prompt_chunk,
                            args.temperature)
    result["machine"] = machine_info()
    write_json(args.output, result)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
