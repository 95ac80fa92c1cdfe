"""The served prefill attention kernel against torch's SDPA, timed in alternation.

torch's SDPA on the same 4 x 4096 causal bf16 shapes has measured 534-606 TFLOP/s on one
H200 depending on when in a script it ran; timing the two in turns, several rounds, puts
both under the same clocks and power. Per round and cache block size: the served kernel
(``kernels.prefill_attention.prefill_attention`` over a paged cache, whichever kernel it
dispatches to) and SDPA (cuDNN's or flash's kernel, as torch picks, on contiguous
tensors), each the median of about ``--rep-ms`` of runs with L2 flushed; then the median
ratio.

Usage: ``python benchmarks/prefill_vs_sdpa.py [--rounds 5] [--rep-ms 200]
[--cache-block-sizes 16 64] [--output FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import bench, paged_kv, prefill_problem  # noqa: E402

NUM_SEQS, SEQ_LEN, HEADS, KV_HEADS, HEAD_DIM = 4, 4096, 32, 8, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--cache-block-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/prefill_vs_sdpa.py needs a CUDA GPU")
    from kernels.prefill_attention import prefill_attention

    dtype = torch.bfloat16
    q, qsl, flops, sdpa = prefill_problem(NUM_SEQS, SEQ_LEN, HEADS, HEAD_DIM, dtype)
    caches = {b: paged_kv(NUM_SEQS, SEQ_LEN, KV_HEADS, HEAD_DIM, b, dtype)
              for b in args.cache_block_sizes}

    def tflops(ms: float) -> float:
        return flops / (ms * 1e-3) / 1e12

    rounds = {b: [] for b in caches}
    cache = {}  # the Gluon kernel's query tiles, built once as for a step's layers
    print(f"{torch.cuda.get_device_name()}: {NUM_SEQS}x{SEQ_LEN} causal bf16, {HEADS} heads "
          f"({KV_HEADS} KV), head dim {HEAD_DIM}; TFLOP/s")
    print(f"{'round':>5s} {'blocks':>6s} {'served':>8s} {'SDPA':>8s} {'ratio':>6s}")
    for r in range(args.rounds):
        for b, (kc, vc, tables, seq) in caches.items():
            served = tflops(bench(lambda kc=kc, vc=vc, tables=tables, seq=seq:
                                  prefill_attention(q, kc, vc, tables, seq, qsl,
                                                    HEAD_DIM ** -0.5, max_query_len=SEQ_LEN,
                                                    batch_cache=cache,
                                                    # as served: no one-query request
                                                    split_one_token=False),
                                  rep_ms=args.rep_ms))
            ref = tflops(bench(sdpa, rep_ms=args.rep_ms))
            rounds[b].append(dict(served_tflops=served, sdpa_tflops=ref))
            print(f"{r:5d} {b:6d} {served:8.0f} {ref:8.0f} {served / ref:6.2f}")
    summary = {}
    for b, rows in rounds.items():
        summary[b] = dict(
            served_tflops=statistics.median(x["served_tflops"] for x in rows),
            sdpa_tflops=statistics.median(x["sdpa_tflops"] for x in rows),
            ratio=statistics.median(x["served_tflops"] / x["sdpa_tflops"] for x in rows))
        s = summary[b]
        print(f"median, blocks of {b}: served {s['served_tflops']:.0f}, SDPA "
              f"{s['sdpa_tflops']:.0f}, {s['ratio']:.2f}x")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rounds=rounds,
                           summary=summary), f, indent=1)


if __name__ == "__main__":
    main()
