"""Weights fetched into L2 while the DRAM is idle, then read by batch-1 GEMVs: what the
prefetch of ``worker_svc/layers/l2_prefetch.py`` takes off the projections after attention.

Run on a CUDA GPU of compute capability 9.0+: ``python benchmarks/l2_prefetch.py``. Per
decoder layer of Llama-3-8B (32 layers of distinct weights), a CUDA graph replays what a
batch-1 decode step runs between the q/k/v projection and the down projection, reduced to
its parts that matter here: a window of W microseconds in which one small kernel runs and
the DRAM is idle (``torch.cuda._sleep``, standing in for rotary, the KV write, decode
attention over a short context and its merge), then the o projection and the gate/up
projection at one row as served (e4m3 weights: the word GEMV, gate/up with SiLU-and-mul in
its epilogue; bf16: the GEMV). With the prefetch, ``WeightPrefetch`` forks a side stream
at the window's start and asks L2 for the o weight, then the head of gate/up, up to the
budget. Each replay starts after a 256 MB read flush (``benchmarks.kernels.graph_bench``).
The table gives ms per 32 layers and what the prefetch saved against the same graph
without it; ``evict_last`` is the lines' L2 priority (the served default).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gemv import NUM_LAYERS, _weights  # noqa: E402
from benchmarks.kernels import graph_bench  # noqa: E402
from gridllm.bench.roofline import measure_limits  # noqa: E402
from kernels.gemv import gemv  # noqa: E402
from kernels.l2_prefetch import l2_prefetch, supported  # noqa: E402
from worker_svc.layers.attention import AttentionMetadata  # noqa: E402
from worker_svc.layers.l2_prefetch import WeightPrefetch, layer_spans  # noqa: E402

# (out, in) of Llama-3-8B's o and gate/up projections.
O_SHAPE = (4096, 4096)
GATE_UP_SHAPE = (28672, 4096)
WINDOWS_US = (0.0, 4.0, 8.0, 12.0)
BUDGETS_MB = (8, 16, 24, 32, 40)


def _sleep_cycles_per_us() -> float:
    """Clock cycles of ``torch.cuda._sleep`` per microsecond, from one timed call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / (start.elapsed_time(end) * 1000.0)


def _step(o_weights, gate_up_weights, x, window_cycles: int,
          prefetch: WeightPrefetch | None, meta: AttentionMetadata):
    """One replay's calls: per layer the window, then o and gate/up at one row."""
    def run():
        for i, ((wo, so), (wg, sg)) in enumerate(zip(o_weights, gate_up_weights,
                                                     strict=True)):
            if prefetch is not None:
                prefetch.after_qkv(i, 1, meta)
            if window_cycles:
                torch.cuda._sleep(window_cycles)
            gemv(x, wo, None, so)
            gemv(x, wg, None, sg, silu_out=True)
        if prefetch is not None:
            prefetch.join()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows-us", type=float, nargs="+", default=list(WINDOWS_US))
    parser.add_argument("--budgets-mb", type=float, nargs="+", default=list(BUDGETS_MB))
    parser.add_argument("--kinds", nargs="+", default=["fp8", "bf16"],
                        choices=["fp8", "bf16"])
    parser.add_argument("--output", default=None, help="write results as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda")
    if not torch.cuda.is_available() or not supported(device):
        sys.exit("benchmarks/l2_prefetch.py needs a CUDA GPU of compute capability 9.0+")
    limits = measure_limits(device)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    print(f"{torch.cuda.get_device_name()}: copy {limits['copy_bandwidth_gbps']:.0f} GB/s, "
          f"L2 {l2 / 2**20:.0f} MiB, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    per_us = _sleep_cycles_per_us()
    x = torch.randn(1, O_SHAPE[1], device=device, dtype=torch.bfloat16)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(1, dtype=torch.int64, device=device),
        query_start_loc=torch.arange(2, dtype=torch.int32, device=device),
        seq_lens=torch.full((1,), 256, dtype=torch.int32, device=device),
        block_tables=torch.zeros(1, 16, dtype=torch.int32, device=device),
        max_query_len=1, max_seq_len=256)
    side = torch.cuda.Stream(device)
    results = {"device": torch.cuda.get_device_name(), "limits": limits, "l2_bytes": l2,
               "rows": []}
    for kind in args.kinds:
        o_weights = _weights(*O_SHAPE, kind == "fp8")
        gate_up_weights = _weights(*GATE_UP_SHAPE, kind == "fp8")
        weights = [[wo, wg] for (wo, _), (wg, _) in zip(o_weights, gate_up_weights,
                                                        strict=True)]
        print(f"\n{kind} weights, ms per {NUM_LAYERS} layers (o + gate/up at one row)")
        print(f"{'window':>8} {'budget':>8} {'policy':>11} {'plain':>8} {'prefetch':>9} "
              f"{'saved':>8}")
        for window_us in args.windows_us:
            cycles = int(window_us * per_us)
            plain = graph_bench(_step(o_weights, gate_up_weights, x, cycles, None, meta))
            for budget_mb in args.budgets_mb:
                spans = layer_spans(weights, int(budget_mb * 2**20))
                for evict_last in (True, False):
                    prefetch = WeightPrefetch(
                        spans, max_kv_tokens=1 << 30, stream=side,
                        launch=functools.partial(l2_prefetch, evict_last=evict_last))
                    ms = graph_bench(_step(o_weights, gate_up_weights, x, cycles, prefetch,
                                           meta))
                    policy = "evict_last" if evict_last else "normal"
                    print(f"{window_us:>6.1f}us {budget_mb:>6.0f}MB {policy:>11} "
                          f"{plain:>8.3f} {ms:>9.3f} {plain - ms:>+8.3f}", flush=True)
                    results["rows"].append(dict(kind=kind, window_us=window_us,
                                                budget_mb=budget_mb, evict_last=evict_last,
                                                plain_ms=plain, prefetch_ms=ms))
        del o_weights, gate_up_weights, weights
        torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
