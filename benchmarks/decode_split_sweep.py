"""Split-KV decode attention at small batches and long contexts: every launch configuration
against the copy bandwidth, to choose ``pick_decode_launch``'s table.

For each (batch, context) the script times the paged decode kernel over a grid of split
counts, keys per iteration, warps and pipeline stages, inside a CUDA graph (as the serving
path runs decode) with L2 flushed before each replay, and prints the best configurations next
to the default one. The bytes counted are the KV read once (2 x batch x context x kv heads x
head dim x 2 bytes) plus the queries.

Usage: ``python benchmarks/decode_split_sweep.py [--batches 1 2 4] [--contexts 8192 32768]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import GB, graph_bench, paged_kv  # noqa: E402
from gridllm.bench.roofline import measure_limits  # noqa: E402
from kernels.paged_decode_attention import paged_decode_attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--splits", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    limits = measure_limits(torch.device("cuda"))
    copy = limits["copy_bandwidth_gbps"]
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    heads, kv_heads, head_dim, dtype = 32, 8, 128, torch.bfloat16
    rows = []
    for batch, context in itertools.product(args.batches, args.contexts):
        kc, vc, tables, seq = paged_kv(batch, context, kv_heads, head_dim, 16, dtype)
        q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype)
        call = (q, kc, vc, tables, seq, None, head_dim ** -0.5)
        nbytes = 2 * batch * context * kv_heads * head_dim * 2 + 2 * q.numel() * 2
        reference = paged_decode_attention(*call).float()

        def measure(call=call, reference=reference, nbytes=nbytes, **launch):
            out = paged_decode_attention(*call, **launch)
            torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)
            ms = graph_bench(lambda: paged_decode_attention(*call, **launch))
            return ms, 100 * nbytes / (ms * 1e-3) / GB / copy

        default_ms, default_pct = measure()
        results = []
        for splits, block_n, warps, stages in itertools.product(
                args.splits, args.block_n, args.warps, args.stages):
            if context // splits < block_n:
                continue
            try:
                ms, pct = measure(num_splits=splits, block_n=block_n, num_warps=warps,
                                  num_stages=stages)
            except Exception as exc:  # noqa: BLE001 - a configuration that does not fit
                print(f"  b{batch} ctx{context} {splits}/{block_n}/{warps}/{stages}: "
                      f"{type(exc).__name__}")
                continue
            results.append(dict(splits=splits, block_n=block_n, warps=warps, stages=stages,
                                ms=ms, pct=pct))
        results.sort(key=lambda r: r["ms"])
        print(f"batch {batch}, context {context}: default {1e3 * default_ms:.1f} us "
              f"= {default_pct:.1f}% of copy; best:")
        for r in results[:5]:
            print(f"  splits {r['splits']:4d} block_n {r['block_n']:4d} warps {r['warps']} "
                  f"stages {r['stages']}: {1e3 * r['ms']:.1f} us = {r['pct']:.1f}%")
        rows.append(dict(batch=batch, context=context, default_ms=default_ms,
                         default_pct=default_pct, results=results))
        del kc, vc
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), limits=limits, rows=rows), f)


if __name__ == "__main__":
    main()
