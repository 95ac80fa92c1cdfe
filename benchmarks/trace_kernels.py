"""Per-kernel time of each step, from a Chrome trace of ``gridllm.bench.gpu_busy --trace``.

    python -m gridllm.bench.gpu_busy --model random:llama3-8b --batch-size 1 \\
        --quantization fp8 --kv-cache-dtype fp8 --trace busy.json
    python benchmarks/trace_kernels.py busy.json [--marker _gemv_kernel] [--output k.json]

The GPU's activity (kernels, copies, memsets) is cut into steps at a marker kernel that
runs once a step (``--marker``; by default the kernel name seen the fewest times, at least
twice: a step's LM head or argmax). For each kernel (name and grid) it prints, per step:
how many ran, their own time (the sum of their spans) and their **end-to-end** time (from
the end of the activity before each to its own end). With programmatic dependent launch a
kernel starts before the one before it ends and waits, so its span counts that wait; the
end-to-end time does not, and the end-to-end times add up to the step. ``--layers`` adds
the same per position in the block of kernels that repeats (a decoder layer: its q/k/v
and o GEMVs apart, though they share a grid), its length found in the trace or given
(``--layer-period``).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import sys
from collections.abc import Iterable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench.report import format_table, write_json  # noqa: E402

_GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def gpu_events(trace: dict) -> list[dict]:
    """The trace's GPU activity (complete events of kernels, copies and memsets), by start."""
    events = [e for e in trace.get("traceEvents", [])
              if e.get("ph") == "X" and e.get("cat") in _GPU_CATEGORIES]
    return sorted(events, key=lambda e: e["ts"])


def default_marker(events: Iterable[dict]) -> str:
    """The kernel name seen the fewest times, at least twice (the first seen among ties)."""
    counts = collections.Counter(e["name"] for e in events if e.get("cat") == "kernel")
    repeated = [name for name, n in counts.items() if n >= 2]
    if not repeated:
        raise ValueError("marker: no kernel runs twice in the trace; pass --marker.")
    fewest = min(counts[name] for name in repeated)
    return next(name for name in repeated if counts[name] == fewest)


def kernel_table(events: list[dict], marker: str) -> dict:
    """Per (name, grid) and per step: count, own and end-to-end microseconds; the steps are
    the activity after each ``marker`` kernel up to and including the next one."""
    marks = [i for i, e in enumerate(events) if e["name"] == marker]
    if len(marks) < 2:
        raise ValueError(f"marker: {marker!r} runs {len(marks)} time(s); a step needs two.")
    num_steps = len(marks) - 1
    rows: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    span = 0.0
    for a, b in zip(marks[:-1], marks[1:], strict=True):
        marker_end = events[a]["ts"] + events[a]["dur"]
        span += events[b]["ts"] + events[b]["dur"] - marker_end
        step = events[a + 1:b + 1]
        for e, e2e in zip(step, _end_to_end(step, marker_end), strict=True):
            row = rows[_key(e)]
            row[0] += 1
            row[1] += e["dur"]
            row[2] += e2e
    kernels = [dict(name=name, grid=json.loads(grid), per_step=n / num_steps,
                    own_us_per_step=own / num_steps, end_to_end_us_per_step=e2e / num_steps,
                    own_us_mean=own / n, end_to_end_us_mean=e2e / n)
               for (name, grid), (n, own, e2e) in rows.items()]
    kernels.sort(key=lambda k: -k["end_to_end_us_per_step"])
    return dict(marker=marker, num_steps=num_steps, step_us=span / num_steps,
                kernels=kernels)


def _key(event: dict) -> tuple[str, str]:
    """What tells kernels apart in the tables: the name and the grid (as JSON)."""
    return event["name"], json.dumps(event.get("args", {}).get("grid"))


def _end_to_end(events: list[dict], previous_end: float | None = None) -> list[float]:
    """Each event's end-to-end time: from the end of the activity before it (the latest
    end so far, starting at ``previous_end``) to its own end; without ``previous_end`` the
    first event's own span."""
    times = []
    for e in events:
        end = e["ts"] + e["dur"]
        times.append(e["dur"] if previous_end is None else max(0.0, end - previous_end))
        previous_end = end if previous_end is None else max(previous_end, end)
    return times


def layer_period(keys: list, longest: int = 64) -> int:
    """The length of the repeating block of kernels (a decoder layer's): the shortest
    shift, up to ``longest``, at which more than half of the kernels meet the same kernel
    again (a step's layers outnumber its other kernels).

    Raises:
        ValueError: no such shift.
    """
    n = len(keys)
    for p in range(1, min(longest, n // 3) + 1):
        if sum(keys[i] == keys[i + p] for i in range(n - p)) > (n - p) / 2:
            return p
    raise ValueError("layers: no block of kernels repeats in the trace.")


def layer_table(events: list[dict], period: int | None = None) -> dict:
    """Per position in the repeating block of ``period`` kernels (``layer_period`` when
    None): its kernel, how many whole blocks it was seen in, mean own and end-to-end
    microseconds. Blocks are read from the start of each stretch where the kernels repeat
    with that period."""
    keys, e2e = [_key(e) for e in events], _end_to_end(events)
    period = period or layer_period(keys)
    n = len(keys)
    sums = [[0, 0.0, 0.0] for _ in range(period)]
    labels: list[tuple[str, str] | None] = [None] * period
    i = 0
    while i + period < n:
        if keys[i] != keys[i + period]:
            i += 1
            continue
        start = i
        while i + period < n and keys[i] == keys[i + period]:
            i += 1
        # Kernels start .. i + period - 1 repeat: whole blocks start at start .. i.
        for block in range(start, i + 1, period):
            for offset in range(period):
                j = block + offset
                labels[offset] = labels[offset] or keys[start + offset]
                sums[offset][0] += 1
                sums[offset][1] += events[j]["dur"]
                sums[offset][2] += e2e[j]
        i += period
    positions = [dict(position=o, name=labels[o][0], grid=json.loads(labels[o][1]),
                      count=c, own_us_mean=own / c, end_to_end_us_mean=t / c)
                 for o, (c, own, t) in enumerate(sums) if c]
    return dict(period=period, positions=positions,
                end_to_end_us_per_block=sum(p["end_to_end_us_mean"] for p in positions))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="a Chrome trace (.json or .json.gz) of gpu_busy --trace")
    p.add_argument("--marker", default=None, help="a kernel that runs once a step")
    p.add_argument("--top", type=int, default=25, help="rows printed")
    p.add_argument("--layers", action="store_true",
                   help="also a table per position in the repeating block of kernels (a "
                        "decoder layer)")
    p.add_argument("--layer-period", type=int, default=None,
                   help="the block's length in kernels (default: found in the trace)")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as f:
        events = gpu_events(json.load(f))
    result = kernel_table(events, args.marker or default_marker(events))
    rows = [[k["name"][:48], str(k["grid"]), k["per_step"], k["own_us_per_step"],
             k["end_to_end_us_per_step"], k["own_us_mean"], k["end_to_end_us_mean"]]
            for k in result["kernels"][:args.top]]
    print(f"{result['num_steps']} steps between {result['marker'][:60]!r} kernels, "
          f"{result['step_us']:.1f} us a step")
    print(format_table(rows, ["kernel", "grid", "a step", "own us", "end-to-end us",
                              "own us each", "end-to-end us each"]))
    if args.layers or args.layer_period:
        layers = result["layers"] = layer_table(events, args.layer_period)
        print(f"\nblocks of {layers['period']} kernels, "
              f"{layers['end_to_end_us_per_block']:.2f} us end to end each")
        print(format_table([[p["position"], p["name"][:48], str(p["grid"]), p["count"],
                             p["own_us_mean"], p["end_to_end_us_mean"]]
                            for p in layers["positions"]],
                           ["position", "kernel", "grid", "blocks", "own us",
                            "end-to-end us"]))
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
