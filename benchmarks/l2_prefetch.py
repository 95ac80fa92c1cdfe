"""Weights fetched into L2 while the DRAM is idle, then read by batch-1 GEMVs: what the
prefetch of ``worker_svc/layers/l2_prefetch.py`` takes off a decode step's projections.

Run on a CUDA GPU of compute capability 9.0+: ``python benchmarks/l2_prefetch.py``. Per
decoder layer of Llama-3-8B (32 layers of distinct weights), a CUDA graph replays a batch-1
decode step's linear layers as served (e4m3 weights: the norm kernel, then the word GEMV;
gate/up with SiLU-and-mul in its epilogue; bf16: the GEMV) with, between q/k/v and o, a
window of W microseconds in which one small kernel runs and the DRAM is idle
(``torch.cuda._sleep``, standing in for rotary, the KV write, decode attention over a short
context and its merge). With a prefetch plan, ``WeightPrefetch`` forks a side stream at
the window's start and asks L2 for the plan's bytes: ``o+gate_up`` (the served plan: the o
weight, then the head of gate/up, up to the budget), ``o+next_qkv`` (the o weight, then
the next layer's q/k/v weight, read after the 175 MB of gate/up and down have streamed
past: whether ``evict_last`` keeps it), or ``+next@o`` (the served plan, and after the o
projection the head of the next layer's q/k/v, ``NEXT_MB``: what
``GRIDLLM_L2_PREFETCH_NEXT_MB`` serves). Busy windows read ``--busy-mb`` megabytes
instead of sleeping (as attention over a long context streams the KV cache): whether the
prefetched lines survive such a read (``evict_last`` against the read's normal priority)
and what the prefetch then costs, which is what the served gate on the context avoids.
Each replay starts after a 256 MB read flush
(``benchmarks.kernels.graph_bench``). The table gives ms per 32 layers and what the
prefetch saved against the same graph without it; the window alone is also timed.
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
from kernels.l2_prefetch import l2_prefetch, span_bytes, supported  # noqa: E402
from kernels.rms_norm import rms_norm  # noqa: E402
from worker_svc.layers.attention import AttentionMetadata  # noqa: E402
from worker_svc.layers.l2_prefetch import WeightPrefetch, layer_spans  # noqa: E402

# (name, out, in) of Llama-3-8B's projections, in the order a layer reads them.
SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
          ("down", 4096, 14336))
WINDOWS_US = (0.0, 4.0, 8.0, 12.0)
BUDGETS_MB = (16, 24, 32, 40)
# The ``+next@o`` plan's bytes of the next layer's q/k/v (MiB).
NEXT_MB = 12
# Busy windows: megabytes read (batch 1 x 32k keys of Llama-3-8B's bf16 cache: 134 MB).
BUSY_MB = (16.0, 134.0)
REPLAYS = 60


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


def _step(weights: dict, x: dict, norm_weight, window,
          prefetch: WeightPrefetch | None, meta: AttentionMetadata, fp8: bool):
    """One replay's calls: per layer q/k/v, the window (a callable or None), o, gate/up
    and down at one row."""
    def run():
        for i in range(NUM_LAYERS):
            if fp8:
                rms_norm(x["qkv"], norm_weight, 1e-5)
            gemv(x["qkv"], *_w(weights["qkv"][i]))
            if prefetch is not None:
                prefetch.after_qkv(i, 1, meta)
            if window is not None:
                window()
            gemv(x["o"], *_w(weights["o"][i]))
            if prefetch is not None:
                prefetch.after_o(i, 1, meta)
            if fp8:
                rms_norm(x["gate_up"], norm_weight, 1e-5)
            gemv(x["gate_up"], *_w(weights["gate_up"][i]), silu_out=True)
            gemv(x["down"], *_w(weights["down"][i]))
        if prefetch is not None:
            prefetch.join()
    return run


def _w(weight_and_scale):
    """``gemv``'s weight, bias and scale arguments."""
    w, s = weight_and_scale
    return w, None, s


def _plans(weights: dict, budget: int) -> dict[str, tuple[list, list]]:
    """Each plan's spans per layer after q/k/v and after o (see the module docstring)."""
    served = layer_spans([[weights["o"][i][0], weights["gate_up"][i][0]]
                          for i in range(NUM_LAYERS)], budget)
    next_qkv, next_at_o = [], []
    for i in range(NUM_LAYERS):
        o = span_bytes(weights["o"][i][0], budget)
        spans, at_o = [o], []
        if i + 1 < NUM_LAYERS:
            qkv = weights["qkv"][i + 1][0]
            spans.append(span_bytes(qkv, budget - o.numel()))
            at_o.append(span_bytes(qkv, NEXT_MB << 20))
        next_qkv.append([s for s in spans if s.numel()])
        next_at_o.append([s for s in at_o if s.numel()])
    none = [[] for _ in range(NUM_LAYERS)]
    return {"o+gate_up": (served, none), "o+next_qkv": (next_qkv, none),
            "+next@o": (served, next_at_o)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows-us", type=float, nargs="+", default=list(WINDOWS_US),
                        help="windows that sleep this many microseconds")
    parser.add_argument("--budgets-mb", type=float, nargs="+", default=list(BUDGETS_MB))
    parser.add_argument("--busy-mb", type=float, nargs="*", default=list(BUSY_MB),
                        help="windows that read this many MB instead of sleeping")
    parser.add_argument("--busy-budget-mb", type=float, default=24.0,
                        help="the served plan's budget in the busy windows")
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
    x = {name: torch.randn(1, k, device=device, dtype=torch.bfloat16)
         for name, _, k in SHAPES}
    norm_weight = torch.rand(SHAPES[0][2], device=device, dtype=torch.bfloat16) + 0.5
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(1, dtype=torch.int64, device=device),
        query_start_loc=torch.arange(2, dtype=torch.int32, device=device),
        seq_lens=torch.full((1,), 256, dtype=torch.int32, device=device),
        block_tables=torch.zeros(1, 16, dtype=torch.int32, device=device),
        max_query_len=1, max_seq_len=256)
    side = torch.cuda.Stream(device)
    busy = torch.ones(int(max(args.busy_mb, default=0) * 2**19), device=device,
                      dtype=torch.bfloat16)
    results = {"device": torch.cuda.get_device_name(), "limits": limits, "l2_bytes": l2,
               "rows": []}
    for kind in args.kinds:
        fp8 = kind == "fp8"
        weights = {name: _weights(n, k, fp8) for name, n, k in SHAPES}
        print(f"\n{kind} weights, ms per {NUM_LAYERS} layers (the linear layers at one row "
              f"and the window)")
        print(f"{'window':>8} {'alone':>7} {'plan':>11} {'budget':>7} {'policy':>11} "
              f"{'plain':>8} {'prefetch':>9} {'saved':>8}")
        windows = [(f"{w:.0f}us", None if w <= 0 else
                    functools.partial(torch.cuda._sleep, int(w * per_us)), args.budgets_mb)
                   for w in args.windows_us]
        windows += [(f"{mb:.0f}MB", functools.partial(torch.sum, busy[:int(mb * 2**19)]),
                     [args.busy_budget_mb]) for mb in args.busy_mb]
        for label, window, budgets in windows:
            alone = graph_bench(lambda f=window: [f() for _ in range(NUM_LAYERS)],
                                reps=REPLAYS) if window is not None else 0.0
            plain = graph_bench(_step(weights, x, norm_weight, window, None, meta, fp8),
                                reps=REPLAYS)
            for budget_mb in budgets:
                for plan, (spans, at_o) in _plans(weights, int(budget_mb * 2**20)).items():
                    for evict_last in (True, False):
                        if plan != "o+gate_up" and (not evict_last or label.endswith("MB")):
                            continue
                        prefetch = WeightPrefetch(
                            spans, max_kv_tokens=1 << 30, stream=side,
                            launch=functools.partial(l2_prefetch, evict_last=evict_last),
                            spans_after_o=at_o)
                        prefetch.warm_up()  # built before the capture (it prefetches there)
                        ms = graph_bench(_step(weights, x, norm_weight, window, prefetch,
                                               meta, fp8), reps=REPLAYS)
                        policy = "evict_last" if evict_last else "normal"
                        print(f"{label:>8} {alone:>7.3f} {plan:>11} "
                              f"{budget_mb:>5.0f}MB {policy:>11} {plain:>8.3f} {ms:>9.3f} "
                              f"{plain - ms:>+8.3f}", flush=True)
                        results["rows"].append(dict(
                            kind=kind, window=label, window_alone_ms=alone,
                            plan=plan, budget_mb=budget_mb, evict_last=evict_last,
                            plain_ms=plain, prefetch_ms=ms))
        del weights
        torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
