"""Engine steps with a module-level switch on and off, in turns in one process.

Two processes timed one after the other differ by more than a host-bound step's
launch work: each compiles, allocates and warms up on its own, and 24 steps of a few
milliseconds are a tenth of a second. Here one engine serves both sides: windows of
``--window`` steps alternate between the switch set to 1 and to 0 (the order flips every
round), ``--rounds`` rounds, and each side reports the median and spread of its windows'
milliseconds per step. A switch takes effect where it is read at each step (a step's
launch plans are built per step): ``kernels._launch.DIRECT_LAUNCH``, for one.

    python benchmarks/switch_ab.py --switch kernels._launch.DIRECT_LAUNCH \\
        --model random:qwen3-0.6b --batch-size 4 --input-len 2048 --prompt-chunk 64

Without ``--prompt-chunk`` the steps are decode steps of ``--batch-size`` requests (their
prompts computed first); with it, prompt steps of that many tokens.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench.gpu_busy import _add, _run_steps, warm_engine  # noqa: E402
from gridllm.common.config import KV_CACHE_DTYPES  # noqa: E402


def resolve_switch(name: str) -> tuple[object, str]:
    """``package.module.ATTRIBUTE`` as (module, attribute); the attribute must exist."""
    module_name, _, attribute = name.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"switch must be module.ATTRIBUTE, got {name!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"switch: cannot import {module_name!r} ({exc}).") from None
    if not hasattr(module, attribute):
        raise ValueError(f"switch: {module_name} has no attribute {attribute!r}.")
    return module, attribute


def turns(rounds: int) -> list[bool]:
    """The switch's value for each window: on/off, then off/on, ... (each side first in
    half the rounds)."""
    order: list[bool] = []
    for r in range(rounds):
        order += [True, False] if r % 2 == 0 else [False, True]
    return order


def summarize(windows: list[float]) -> dict:
    return {"median_ms_per_step": statistics.median(windows),
            "min_ms_per_step": min(windows), "max_ms_per_step": max(windows),
            "windows_ms_per_step": windows}


def switch_ab(switch: str, model: str, batch_size: int, input_len: int,
              prompt_chunk: int | None, window: int, rounds: int,
              quantization: str | None = None, kv_cache_dtype: str = "auto") -> dict:
    if window < 1 or rounds < 1:
        raise ValueError(f"window and rounds must be >= 1, got {window} and {rounds}.")
    module, attribute = resolve_switch(switch)
    steps = 2 * window * rounds
    if prompt_chunk is not None and batch_size * input_len < (steps + 1) * prompt_chunk:
        raise ValueError(
            f"prompt steps: batch_size * input_len ({batch_size * input_len}) must exceed "
            f"2 * window * rounds * prompt_chunk ({steps * prompt_chunk}).")
    engine, batches, params = warm_engine(model, batch_size, input_len, 2, steps,
                                          quantization=quantization,
                                          kv_cache_dtype=kv_cache_dtype,
                                          prompt_chunk=prompt_chunk)
    _add(engine, "ab", batches[0], params, prefill=prompt_chunk is None)
    default = getattr(module, attribute)
    sides: dict[bool, list[float]] = {True: [], False: []}
    try:
        for on in turns(rounds):
            setattr(module, attribute, on)
            sides[on].append(_run_steps(engine, window) * 1e3 / window)
    finally:
        setattr(module, attribute, default)
    from gridllm.bench.report import machine_info

    on, off = summarize(sides[True]), summarize(sides[False])
    return {"machine": machine_info(), "switch": switch, "default": default, "model": model,
            "batch_size": batch_size,
            "input_len": input_len, "prompt_chunk": prompt_chunk, "window": window,
            "rounds": rounds, "quantization": quantization,
            "kv_cache_dtype": kv_cache_dtype, "on": on, "off": off,
            "on_over_off": on["median_ms_per_step"] / off["median_ms_per_step"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switch", required=True, help="module.ATTRIBUTE set to 1 and to 0")
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--prompt-chunk", type=int, default=None)
    p.add_argument("--window", type=int, default=4, help="steps a window")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--quantization", default=None, choices=("fp8",))
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    from gridllm.bench.report import write_json

    result = switch_ab(args.switch, args.model, args.batch_size, args.input_len,
                       args.prompt_chunk, args.window, args.rounds, args.quantization,
                       args.kv_cache_dtype)
    for side in ("on", "off"):
        s = result[side]
        print(f"{args.switch}={int(side == 'on')}: median {s['median_ms_per_step']:.3f} ms a "
              f"step (windows {s['min_ms_per_step']:.3f}-{s['max_ms_per_step']:.3f})")
    print(f"on / off: {result['on_over_off']:.3f}")
    write_json(args.output, result)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
