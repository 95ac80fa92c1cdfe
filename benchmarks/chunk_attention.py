"""Prefill attention of short steps: one prompt chunk of a few dozen to a few hundred tokens
after a long cached context (the tail of a chunked prompt, a small step's prompt), through
``prefill_attention`` without the chunk kernel (the kernel the step took before: the
Gluon kernel over a 16-bit cache on Hopper, the Triton one over FP8) and with it
(``kernels.chunk_attention``: query tiles of the GQA group's heads, the keys split across
programs, its launch and split count as served, then at half and twice the splits).

``--sweep`` also times the chunk kernel's launches (rows of a program's product, keys per
iteration, warps, stages) at one chunk and context. Timed from CUDA graphs (GPU time: the
median of ``--reps`` replays, L2 flushed), Llama-3-8B's heads (32, 8 KV, head dim 128),
bf16 queries over a bf16 and an e4m3 cache of 16-token blocks.

Usage: ``python benchmarks/chunk_attention.py [--chunks 16 32 64 128 256 512]
[--contexts 1024 4096 16384] [--sweep] [--reps 100] [--output FILE]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import graph_bench  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def chunk_batch(chunk: int, context: int, cache_dtype: torch.dtype) -> dict:
    """One request: ``context`` cached tokens, then this step's ``chunk`` (its KV written)."""
    seq = context + chunk
    width = -(-seq // BLOCK)
    shape = (width, BLOCK, KV_HEADS, HEAD_DIM)
    caches = [torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(cache_dtype)
              for _ in range(2)]
    return dict(query=torch.randn(chunk, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
                key_cache=caches[0], value_cache=caches[1],
                block_tables=torch.randperm(width, device="cuda").to(torch.int32)[None],
                seq_lens=torch.tensor([seq], dtype=torch.int32, device="cuda"),
                query_start_loc=torch.tensor([0, chunk], dtype=torch.int32, device="cuda"))


def _args(b: dict) -> list:
    return [b[k] for k in ("query", "key_cache", "value_cache", "block_tables", "seq_lens",
                           "query_start_loc")]


def time_case(cache_dtype: torch.dtype, chunk: int, context: int, reps: int) -> dict:
    """GPU us of one chunk after ``context`` keys: without the chunk kernel, with it as
    served, and with it at half and twice the served split count."""
    from kernels import chunk_attention as ck
    from kernels.prefill_attention import prefill_attention

    a = _args(chunk_batch(chunk, context, cache_dtype))
    scale, seq = HEAD_DIM ** -0.5, context + chunk
    caches: dict[bool, dict] = {False: {}, True: {}}

    def served(chunk_kernel: bool):
        return lambda: prefill_attention(*a, scale, max_query_len=chunk,
                                         batch_cache=caches[chunk_kernel],
                                         split_one_token=False, max_seq_len=seq,
                                         chunk=chunk_kernel)

    def direct(num_splits: int):
        out, cache = torch.empty_like(a[0]), {}
        return lambda: ck.chunk_attention(*a, scale, out, chunk, max_seq_len=seq,
                                          batch_cache=cache, num_splits=num_splits)

    us = {"before": graph_bench(served(False), reps=reps),
          "chunk": graph_bench(served(True), reps=reps)}
    # The split count the served call picked (its plan, kept for a step's layers).
    splits = next(v.num_splits for k, v in caches[True].items() if k[0] == "chunk_plan")
    us["half"] = graph_bench(direct(max(1, splits // 2)), reps=reps)
    us["twice"] = graph_bench(direct(min(2 * splits, 64)), reps=reps)
    return dict(splits=splits, us={k: 1e3 * v for k, v in us.items()})


def time_launch(cache_dtype: torch.dtype, chunk: int, context: int, launch: tuple,
                num_splits: int, reps: int) -> float:
    """GPU us of the chunk kernel at ``launch`` and ``num_splits``."""
    from kernels import chunk_attention as ck

    a = _args(chunk_batch(chunk, context, cache_dtype))
    out, cache = torch.empty_like(a[0]), {}
    return 1e3 * graph_bench(
        lambda: ck.chunk_attention(*a, HEAD_DIM ** -0.5, out, chunk, batch_cache=cache,
                                   num_splits=num_splits, launch=launch), reps=reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--sweep", action="store_true",
                        help="the chunk kernel's launches at --sweep-chunk x --sweep-context")
    parser.add_argument("--sweep-chunk", type=int, default=64)
    parser.add_argument("--sweep-context", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if min(args.chunks + args.contexts + [args.reps, args.sweep_chunk]) < 1:
        parser.error("chunks, contexts, --reps and --sweep-chunk must be at least 1")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/chunk_attention.py needs a CUDA GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    caches = {"bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}
    results = []
    print(f"{torch.cuda.get_device_name()}: one chunk after a cached context, {HEADS} heads "
          f"({KV_HEADS} KV), head dim {HEAD_DIM}, blocks of {BLOCK}; us, CUDA graphs")
    print(f"  {'cache':6s} {'chunk':>6s} {'context':>8s} {'before':>9s} {'chunk kernel':>13s} "
          f"{'splits':>7s} {'half':>9s} {'twice':>9s} {'speedup':>8s}")
    for (name, dtype), chunk, context in itertools.product(caches.items(), args.chunks,
                                                            args.contexts):
        r = time_case(dtype, chunk, context, args.reps)
        us = r["us"]
        print(f"  {name:6s} {chunk:6d} {context:8d} {us['before']:9.1f} {us['chunk']:13.1f} "
              f"{r['splits']:7d} {us['half']:9.1f} {us['twice']:9.1f} "
              f"{us['before'] / us['chunk']:7.2f}x", flush=True)
        results.append(dict(cache=name, chunk=chunk, context=context, **r))
    sweep = []
    if args.sweep:
        chunk, context = args.sweep_chunk, args.sweep_context
        print(f"launches at a {chunk}-token chunk after {context} keys ({sms} SMs): rows, "
              f"keys, warps, stages, splits -> us")
        group = HEADS // KV_HEADS
        for (name, dtype), rows, block_n, warps, stages, per_sm in itertools.product(
                caches.items(), (64, 128), (32, 64), (4, 8), (2, 3), (1, 2, 4)):
            programs = -(-chunk // (rows // group)) * KV_HEADS
            splits = max(1, min(64, -(-per_sm * sms // programs), (context + chunk) // 64))
            launch = (rows, block_n, warps, stages)
            try:
                t = time_launch(dtype, chunk, context, launch, splits, args.reps)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                print(f"  {name} {launch} failed: {type(e).__name__}")
                continue
            print(f"  {name} {rows:4d} {block_n:3d} {warps} {stages} {splits:3d} {t:8.1f}",
                  flush=True)
            sweep.append(dict(cache=name, launch=launch, splits=splits, us=t))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), args=vars(args),
                           results=results, sweep=sweep), f, indent=1)


if __name__ == "__main__":
    main()
