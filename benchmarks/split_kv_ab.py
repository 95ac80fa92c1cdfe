"""Split-KV decode's default launch against candidate launches, timed in turns, in a graph of
one call and as a step's layers run it.

For each batch x context (one query a request, Llama-3-8B heads: 32 query heads, 8 KV
heads, head dim 128, a bf16 cache of 16-token blocks) and each timing (``--layers``: calls
a CUDA graph, each over its own cache; 1 also times the graph's launch), every launch is
timed ``--rounds`` times in rotating order (``benchmarks.kernels.graph_bench_each``, the
L2 flushed before each replay), at the default split count; each prints its median us and
its share of the copy bandwidth measured in the same run. Outputs are checked against the
default launch's first.

Usage: ``python benchmarks/split_kv_ab.py [--launch 64,4,2,0 ...] [--batches 1 2 4]
[--contexts 8192 32768] [--layers 1 8] [--rounds 3] [--output FILE]``
(``--launch KEYS,WARPS,STAGES,PREFETCH``: keys a tile, warps, pipeline stages, and 1 to load
each tile's block numbers one tile ahead.)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import GB, decode_problems, graph_bench_each  # noqa: E402
from gridllm.bench.roofline import measure_limits  # noqa: E402
from kernels.paged_decode_attention import paged_decode_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def parse_launch(text: str) -> dict:
    """``KEYS,WARPS,STAGES,PREFETCH`` as ``paged_decode_attention``'s launch overrides."""
    try:
        block_n, num_warps, num_stages, prefetch = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--launch must be KEYS,WARPS,STAGES,PREFETCH (four whole numbers), got {text!r}"
        ) from None
    return dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                prefetch_table=bool(prefetch))


def launch_name(launch: dict) -> str:
    if not launch:
        return "default"
    return (f"{launch['block_n']} keys, {launch['num_warps']} warps, {launch['num_stages']} "
            f"stages{', prefetch' if launch['prefetch_table'] else ''}")


def case(batch: int, context: int, layers: int, launches: list[dict], rounds: int,
         copy_gbps: float) -> list[dict]:
    problems = decode_problems(batch, context, layers, HEADS, KV_HEADS, HEAD_DIM)

    def run(layer: int, **launch) -> torch.Tensor:
        q, kc, vc, tables, seq = problems[layer]
        return paged_decode_attention(q, kc, vc, tables, seq, None, HEAD_DIM ** -0.5,
                                      **launch)

    reference = run(0).float()
    for launch in launches:
        torch.testing.assert_close(run(0, **launch).float(), reference, atol=2e-2, rtol=2e-2)
    times = [[] for _ in launches]
    for r in range(rounds):
        for i in range(len(launches)):
            j = (i + r) % len(launches)
            times[j].append(graph_bench_each(
                [functools.partial(run, layer, **launches[j]) for layer in range(layers)]))
    q, kc = problems[0][:2]
    nbytes = 2 * kc.numel() * kc.element_size() + 2 * q.numel() * q.element_size()
    rows = []
    for launch, ms in zip(launches, times, strict=True):
        median = statistics.median(ms)
        pct = 100 * nbytes / (median * 1e-3) / GB / copy_gbps
        rows.append(dict(batch=batch, context=context, layers=layers,
                         launch=launch_name(launch), us=1e3 * median, pct_of_copy=pct,
                         rounds_us=[1e3 * t for t in ms]))
        print(f"  b{batch} x {context:6d}, {layers} a graph, {launch_name(launch):34s} "
              f"{1e3 * median:7.1f} us = {pct:5.1f}% of copy "
              f"(rounds {' '.join(f'{1e3 * t:.1f}' for t in ms)})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--launch", type=parse_launch, nargs="+",
                        default=[parse_launch("64,4,2,0")],
                        help="candidate launches KEYS,WARPS,STAGES,PREFETCH")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/split_kv_ab.py needs a CUDA GPU")
    limits = measure_limits(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy {limits['copy_bandwidth_gbps']:.0f} GB/s, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    launches = [{}] + args.launch
    rows = []
    for layers in args.layers:
        for batch in args.batches:
            for context in args.contexts:
                rows += case(batch, context, layers, launches, args.rounds,
                             limits["copy_bandwidth_gbps"])
                torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), limits=limits, rows=rows), f,
                      indent=2)


if __name__ == "__main__":
    main()
