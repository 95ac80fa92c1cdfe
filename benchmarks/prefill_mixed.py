"""Prefill attention on a step of continuous batching: one prompt chunk among many requests
that decode one token each, as the engine batches them.

Such a step goes to ``prefill_attention`` whole (it is not decode-only), so every one-token
request takes a query tile of its own there (128 query rows in the Gluon kernel) and
visits all its keys with it. Timed from CUDA graphs (GPU time only: the median of
``--reps`` replays, L2 flushed; timed eagerly, a call whose launches take about as long as
its kernels times the host):

- the mixed step through ``prefill_attention`` (its kernel's tiles built once, as for a
  step's layers) with the one-token requests sent to the decode kernel
  (``split_one_token``): as served, first in the batch (``one_token_prefix``: read and
  written in place, the engine's runner puts them there), and after the chunk, gathered
  and scattered (a caller that does not know the layout); where the Gluon kernel runs, also
  with them left to the prefill kernel (its persistent launch, the default, and a program
  per tile);
- the chunk alone through ``prefill_attention``, without the split (as the engine runs a
  step with no one-token request) and with it;
- the one-token requests alone through ``paged_decode_attention``.

Each also gets its host time per call (Python and launches, the GPU kept busy meanwhile),
which bounds a step's layers where it exceeds the GPU time; ``--profile`` prints where the
served mixed step's host time goes.

Usage: ``python benchmarks/prefill_mixed.py [--chunk 2048] [--decodes 200] [--context 1000]
[--block-size 16] [--reps 200] [--profile] [--trace] [--output FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import graph_bench  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def mixed_batch(chunk: int, decodes: int, context: int, block_size: int,
                dtype: torch.dtype, decodes_first: bool = False) -> dict:
    """A paged cache holding a ``chunk``-token prompt (request 0, or the last request with
    ``decodes_first``; no earlier context) and ``decodes`` requests of ``context`` tokens
    whose last one is this step's query."""
    seq = [chunk] + [context] * decodes
    num_q = [chunk] + [1] * decodes
    if decodes_first:
        seq, num_q = seq[1:] + seq[:1], num_q[1:] + num_q[:1]
    widths = [-(-n // block_size) for n in seq]
    num_blocks = sum(widths)
    blocks = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    tables = torch.zeros(len(seq), max(widths), dtype=torch.int32, device="cuda")
    start = 0
    for i, w in enumerate(widths):
        tables[i, :w] = blocks[start:start + w]
        start += w
    shape = (num_blocks, block_size, KV_HEADS, HEAD_DIM)
    qsl = torch.tensor([0] + num_q, device="cuda").cumsum(0).to(torch.int32)
    return dict(query=torch.randn(sum(num_q), HEADS, HEAD_DIM, device="cuda", dtype=dtype),
                key_cache=torch.randn(shape, device="cuda", dtype=dtype),
                value_cache=torch.randn(shape, device="cuda", dtype=dtype),
                block_tables=tables, seq_lens=torch.tensor(seq, dtype=torch.int32,
                                                           device="cuda"),
                query_start_loc=qsl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--decodes", type=int, default=200)
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of the served mixed step's host time")
    parser.add_argument("--trace", action="store_true",
                        help="print torch.profiler's table (host and GPU time per op) of "
                             "each call")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    for name in ("chunk", "decodes", "context", "block_size", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/prefill_mixed.py needs a CUDA GPU")
    from kernels import gluon_prefill_attention as gpa
    from kernels.paged_decode_attention import paged_decode_attention
    from kernels.prefill_args import query_tiles
    from kernels.prefill_attention import prefill_attention

    b = mixed_batch(args.chunk, args.decodes, args.context, args.block_size, torch.bfloat16)
    scale = HEAD_DIM ** -0.5
    q, kc, vc, tables, seq, qsl = (b[k] for k in ("query", "key_cache", "value_cache",
                                                 "block_tables", "seq_lens",
                                                 "query_start_loc"))
    n = args.chunk
    chunk_qsl = qsl[:2].clone()
    dec_qsl = torch.arange(args.decodes + 1, dtype=torch.int32, device="cuda")
    caches = {}

    def served(name: str, *a, **kw):
        cache = caches.setdefault(name, {})
        return lambda: prefill_attention(*a, scale, max_query_len=n, batch_cache=cache, **kw)

    # The engine's batch with the one-token requests first (the runner puts them there and
    # tells the kernel): their rows are read and written in place, no gather or scatter.
    first = mixed_batch(args.chunk, args.decodes, args.context, args.block_size,
                        torch.bfloat16, decodes_first=True)
    calls = {}
    calls["mixed step, as served: one-token requests first (in place)"] = served(
        "mixed_first", *(first[k] for k in ("query", "key_cache", "value_cache",
                                            "block_tables", "seq_lens", "query_start_loc")),
        one_token_prefix=args.decodes)
    calls["mixed step, one-token requests after the chunk (gathered)"] = served(
        "mixed", q, kc, vc, tables, seq, qsl)
    if gpa.serves(q, kc, vc):
        calls["mixed step, one-token requests left to the prefill kernel"] = served(
            "mixed_nosplit", q, kc, vc, tables, seq, qsl, split_one_token=False)
        # (That row is the persistent launch, the default; this one the other launch.)
        tiles = query_tiles(qsl, seq, q.shape[0], n, gpa.BLOCK_M)
        calls["mixed step, Gluon kernel, a program per tile"] = (
            lambda: gpa.gluon_prefill_attention(q, kc, vc, tables, seq, qsl, scale, n,
                                                tiles=tiles, persistent=False))
    # The engine skips the split in a step without one-query requests.
    calls["the chunk alone, prefill_attention (no split, as served)"] = served(
        "chunk", q[:n], kc, vc, tables[:1], seq[:1], chunk_qsl, split_one_token=False)
    calls["the chunk alone, prefill_attention with the split"] = served(
        "chunk_split", q[:n], kc, vc, tables[:1], seq[:1], chunk_qsl, split_one_token=True)
    calls["the one-token requests alone, paged_decode_attention"] = (
        lambda: paged_decode_attention(q[n:], kc, vc, tables[1:], seq[1:], dec_qsl, scale,
                                       max_seq_len=args.context))
    rows = {name: graph_bench(fn, reps=args.reps) for name, fn in calls.items()}
    host = {name: host_ms(fn) for name, fn in calls.items()}
    print(f"{torch.cuda.get_device_name()}: a {n}-token chunk and {args.decodes} one-token "
          f"requests of {args.context} keys, {HEADS} heads ({KV_HEADS} KV), head dim "
          f"{HEAD_DIM}, bf16 cache of {args.block_size}-token blocks")
    print(f"  {'':60s} {'GPU us':>9s} {'host us':>9s}")
    for name, ms in rows.items():
        print(f"  {name:60s} {1e3 * ms:9.1f} {1e3 * host[name]:9.1f}")
    if args.profile:
        profile_host(calls["mixed step, as served: one-token requests first (in place)"])
    if args.trace:
        for name, fn in calls.items():
            trace_table(name, fn)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), args=vars(args),
                           us={k: 1e3 * v for k, v in rows.items()},
                           host_us={k: 1e3 * v for k, v in host.items()}), f, indent=1)


def host_ms(fn, calls: int = 50) -> float:
    """Milliseconds of host time per call of ``fn`` (launches and Python), the GPU kept
    busy meanwhile so that no launch waits on it."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles, longer than the loop
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e3 * elapsed / calls


def trace_table(name: str, fn, calls: int = 5) -> None:
    """torch.profiler's ops of ``calls`` calls of ``fn``: host and GPU time of each."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    print(f"{name}, {calls} calls:")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12,
                                    max_name_column_width=60))


def profile_host(fn, calls: int = 50, label: str = "the mixed step as served") -> None:
    """cProfile of ``calls`` calls of ``fn`` with the GPU kept busy (host time only)."""
    import cProfile
    import pstats

    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    print(f"host profile of {calls} calls of {label}:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
