"""Launch configurations of the attention kernels against the card's limits, to choose their
heuristics.

``decode``: the paged decode kernel at small batches and long contexts over split counts,
keys per iteration, warps and pipeline stages, timed inside a CUDA graph (as decode is
served) with L2 flushed (a 256 MB read) before each replay, over a bf16 or
(``--kv-cache-dtype fp8``) an e4m3 cache; bytes = the KV read once plus the queries,
against the copy bandwidth. ``prefill``: the causal prefill kernel
(4 x 4096 tokens by default, caches of blocks of 16 and 64 tokens: the pointer and, on
Hopper, the TMA kernel) over tile shapes, warps and stages, in TFLOP/s next to torch's SDPA
on the same shapes in contiguous tensors. Each case prints the best
configurations and the default.

``--layers N`` times the decode cases as a step runs them: N calls, each over its own
cache, in one graph, a call's share of the replay (a graph of one call also times its
launch, ~4 us on Hopper).

``--read-floor`` adds, per decode case, a read-only pass over the same paged K/V (the
split kernel's grid and block-table walk, no attention math, one launch): the most a
kernel that must read those bytes reaches under the same timing (CUDA-graph launch and L2
flush included).

Usage: ``python benchmarks/attention_sweep.py [--kinds decode prefill]
[--kv-cache-dtype auto|fp8] [--key-rows 0 1] [--max-registers 0 168 128]
[--prefetch-table 0 1] [--layers N] [--read-floor] [--gluon-prefill] [--output FILE]``
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time
from collections.abc import Callable

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import (  # noqa: E402
    GB,
    bench,
    decode_problems,
    graph_bench_each,
    paged_kv,
    prefill_problem,
)
from gridllm.bench.roofline import measure_limits  # noqa: E402
from kernels import gluon_prefill_attention as gluon_prefill  # noqa: E402
from kernels.fp8 import FP8_DTYPE  # noqa: E402
from kernels.paged_decode_attention import paged_decode_attention  # noqa: E402
from kernels.prefill_args import query_tiles  # noqa: E402
from kernels.prefill_attention import prefill_attention, uses_tma  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16


@triton.jit
def _paged_read_kernel(kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, out_ptr, stride_cb, stride_ct,
                       stride_ch, stride_bt, num_kv_heads, block_size,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                       NUM_SPLITS: tl.constexpr):
    """Sums the K and V elements of one (request, KV head, split), walking the block table
    as the decode kernel does: its read alone, block numbers loaded a tile ahead."""
    req = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    table = bt_ptr + req * stride_bt
    d = tl.arange(0, HEAD_DIM)
    pos = start + tl.arange(0, BLOCK_N)
    blk_next = tl.load(table + pos // block_size, mask=pos < end, other=0)
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        blk = blk_next.to(tl.int64)
        nxt = pos + BLOCK_N
        blk_next = tl.load(table + nxt // block_size, mask=nxt < end, other=0)
        off = blk * stride_cb + (pos % block_size).to(tl.int64) * stride_ct + kv_head * stride_ch
        mask = (pos < end)[:, None]
        acc += tl.load(kc_ptr + off[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(vc_ptr + off[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (req * num_kv_heads + kv_head) * NUM_SPLITS + split, tl.sum(acc))


def paged_read(key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, num_splits: int, block_n: int = 64) -> torch.Tensor:
    """``[B, Hkv, num_splits]`` float32 sums of the K and V elements each split of the
    decode grid reads (``_paged_read_kernel``): the read-only floor of a decode case."""
    num_reqs = seq_lens.shape[0]
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    out = torch.empty(num_reqs, num_kv_heads, num_splits, dtype=torch.float32,
                      device=key_cache.device)
    _paged_read_kernel[(num_reqs, num_kv_heads, num_splits)](
        key_cache, value_cache, block_tables, seq_lens, out, key_cache.stride(0),
        key_cache.stride(1), key_cache.stride(2), block_tables.stride(0), num_kv_heads,
        block_size, HEAD_DIM=head_dim, BLOCK_N=block_n, NUM_SPLITS=num_splits, num_warps=4)
    return out


def sweep(name: str, run: Callable[..., torch.Tensor], configs: list[dict],
          time_fn: Callable[[Callable[[], object]], float],
          score: Callable[[float], tuple[float, str]]) -> dict:
    """Times ``run(**config)`` for every config (outputs checked against the default's);
    prints and returns the best ones and the default."""
    reference = run().float()
    default_ms = time_fn(run)
    results = []
    for config in configs:
        try:
            torch.testing.assert_close(run(**config).float(), reference, atol=2e-2, rtol=2e-2)
            ms = time_fn(functools.partial(run, **config))
        except Exception as exc:  # noqa: BLE001 - a configuration that does not fit
            print(f"  {name} {config}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        results.append(dict(config, ms=ms, value=score(ms)[0]))
    results.sort(key=lambda r: r["ms"])
    print(f"{name}: default {1e3 * default_ms:.1f} us = {score(default_ms)[1]}; best:")
    for r in results[:6]:
        config = {k: v for k, v in r.items() if k not in ("ms", "value")}
        print(f"  {config}: {1e3 * r['ms']:.1f} us = {score(r['ms'])[1]}")
    return dict(name=name, default_ms=default_ms, default_value=score(default_ms)[0],
                results=results)


def decode_cases(args, copy_gbps: float) -> list[dict]:
    rows = []
    fp8 = {"auto": None, "fp8": FP8_DTYPE, "fp8_e5m2": torch.float8_e5m2}[args.kv_cache_dtype]
    for batch, context in itertools.product(args.batches, args.contexts):
        # A problem a layer, each over its own cache (--layers), timed in one graph.
        problems = decode_problems(batch, context, args.layers, HEADS, KV_HEADS, HEAD_DIM,
                                   16, DTYPE, fp8)
        q, kc = problems[0][:2]
        nbytes = 2 * kc.numel() * kc.element_size() + 2 * q.numel() * q.element_size()

        def run(layer=0, problems=problems, **launch):
            q, kc, vc, tables, seq = problems[layer]
            return paged_decode_attention(q, kc, vc, tables, seq, None, HEAD_DIM ** -0.5,
                                          **launch)

        def time_layers(call):
            return graph_bench_each([functools.partial(call, layer=layer)
                                     for layer in range(args.layers)])

        def score(ms, nbytes=nbytes):
            pct = 100 * nbytes / (ms * 1e-3) / GB / copy_gbps
            return pct, f"{pct:.1f}% of copy"

        if args.read_floor:
            for splits, block_n in itertools.product(args.splits, (32, 64)):
                if context // splits >= block_n:
                    ms = graph_bench_each([
                        functools.partial(paged_read, kc, vc, tables, seq, splits, block_n)
                        for _, kc, vc, tables, seq in problems])
                    print(f"  read-only floor, {splits} splits of {block_n}-key tiles: "
                          f"{1e3 * ms:.1f} us = {score(ms)[1]}")
        # --key-rows unset: each config keeps the default launch's choice of products.
        key_rows = [None] if args.key_rows is None else [bool(k) for k in args.key_rows]
        caps = [None] if args.max_registers is None else args.max_registers
        prefetch = [None] if args.prefetch_table is None else [bool(p)
                                                               for p in args.prefetch_table]
        configs = [dict(num_splits=s, block_n=n, num_warps=w, num_stages=st)
                   | ({} if pf is None else dict(prefetch_table=pf))
                   | ({} if kr is None else dict(key_rows=kr))
                   | ({} if cap is None else dict(max_registers=cap))
                   | ({} if args.gluon is None else dict(gluon=False))
                   for s, n, w, st, pf, kr, cap in itertools.product(
                       args.splits, args.block_n, args.warps, args.stages, prefetch,
                       key_rows, caps)
                   if context // s >= n and (args.gluon is None or 0 in args.gluon)]
        if args.gluon and 1 in args.gluon:  # one split: warps and register caps are its own
            configs += [dict(num_splits=1, block_n=n, num_stages=st, gluon=True)
                        for n, st in itertools.product(args.block_n, args.stages)]
        name = (f"decode b{batch} ctx{context} ({args.kv_cache_dtype} cache"
                f"{f', {args.layers} layers a graph' if args.layers > 1 else ''})")
        rows.append(dict(batch=batch, context=context, kv_cache_dtype=args.kv_cache_dtype,
                         layers=args.layers, **sweep(name, run, configs, time_layers, score)))
        del problems, run, kc, q
    return rows


def prefill_cases(args) -> list[dict]:
    num_seqs, seq_len = args.prefill_shape
    q, qsl, flops, sdpa = prefill_problem(num_seqs, seq_len, HEADS, HEAD_DIM, DTYPE)
    sdpa_ms = bench(sdpa)
    print(f"torch SDPA on contiguous tensors: {flops / (sdpa_ms * 1e-3) / 1e12:.0f} TFLOP/s")

    def score(ms):
        tflops = flops / (ms * 1e-3) / 1e12
        return tflops, f"{tflops:.0f} TFLOP/s ({tflops * sdpa_ms / (flops / 1e9):.2f}x SDPA)"

    configs = [dict(block_m=m, block_n=n, num_warps=w, num_stages=st)
               for m, n, w, st in itertools.product(args.block_m, args.block_n_prefill,
                                                     args.warps_prefill, args.stages)]
    rows = []
    # The Gluon kernel's query tiles, built once as for a step's layers.
    cache = {}
    for block_size in args.cache_block_sizes:
        kc, vc, tables, seq = paged_kv(num_seqs, seq_len, KV_HEADS, HEAD_DIM, block_size,
                                       DTYPE)

        def run(kc=kc, vc=vc, tables=tables, seq=seq, **launch):
            config = launch and (launch["block_m"], launch["block_n"], launch["num_warps"],
                                 launch["num_stages"])
            return prefill_attention(q, kc, vc, tables, seq, qsl, HEAD_DIM ** -0.5,
                                     max_query_len=seq_len, launch=config or None,
                                     batch_cache=cache, split_one_token=False)

        kernel = "TMA" if uses_tma(q, kc, vc, seq_len) else "pointer"
        row = sweep(f"prefill {num_seqs}x{seq_len}, blocks of {block_size} ({kernel} kernel)",
                    run, configs, lambda fn: bench(fn, rep_ms=200), score)
        rows.append(dict(row, sdpa_ms=sdpa_ms, cache_block_size=block_size, kernel=kernel))
        if args.gluon_prefill and gluon_prefill.serves(q, kc, vc):
            # Built once, as for a step's layers (the persistent launch's order too).
            tiles = {p: query_tiles(qsl, seq, q.shape[0], seq_len, gluon_prefill.BLOCK_M,
                                    longest_first=p) for p in (False, True)}

            def run_gluon(kc=kc, vc=vc, tables=tables, seq=seq, tiles=tiles, **launch):
                if not launch:
                    return run(kc, vc, tables, seq)  # the reference: the served kernel
                return gluon_prefill.gluon_prefill_attention(
                    q, kc, vc, tables, seq, qsl, HEAD_DIM ** -0.5, max_query_len=seq_len,
                    tiles=tiles[launch.get("persistent", False)], **launch)

            # Keys a tile, ring stages, and the softmax run under P @ V or after it; then
            # 128-key tiles with a program per SM walking the items.
            gluon_configs = [dict(block_n=n, stages=st, overlap=ov) for n, st, ov in
                             itertools.product((64, 128), (2, 3), (False, True))]
            gluon_configs += [dict(block_n=128, stages=st, overlap=ov, persistent=True)
                              for st, ov in itertools.product((2, 3), (False, True))]
            row = sweep(f"prefill {num_seqs}x{seq_len}, blocks of {block_size} (Gluon, "
                        "warp-specialized; default: the served kernel)", run_gluon,
                        gluon_configs, lambda fn: bench(fn, rep_ms=200), score)
            rows.append(dict(row, sdpa_ms=sdpa_ms, cache_block_size=block_size,
                             kernel="gluon"))
        del kc, vc
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kinds", nargs="+", default=["decode", "prefill"],
                        choices=("decode", "prefill"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--splits", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--key-rows", type=int, nargs="+", default=None, choices=(0, 1),
                        help="decode: 1 runs the products transposed (keys as the MMA's "
                             "rows); '0 1' sweeps both")
    parser.add_argument("--max-registers", type=int, nargs="+", default=None,
                        help="decode: register caps a thread to sweep (0: the compiler's "
                             "count; unset: each config keeps the default launch's)")
    parser.add_argument("--prefetch-table", type=int, nargs="+", default=None,
                        choices=(0, 1), help="decode: 1 loads each tile's block numbers one "
                        "iteration ahead; '0 1' sweeps both (unset: the default's choice)")
    parser.add_argument("--layers", type=int, default=1,
                        help="decode: calls a CUDA graph, each over its own cache, timed a "
                        "call (as a decode step's layers run; 1: the graph's launch counts)")
    parser.add_argument("--read-floor", action="store_true",
                        help="decode: also time a read-only pass over the same paged K/V")
    parser.add_argument("--gluon", type=int, nargs="+", default=None, choices=(0, 1),
                        help="decode over an FP8 cache: 1 sweeps the Gluon kernel (one "
                             "split, --block-n x --stages), 0 the tl.dot kernel; unset: "
                             "each config keeps the default's choice")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        choices=("auto", "fp8", "fp8_e5m2"),
                        help="the decode cases' cache: the queries' bf16, or e4m3 / e5m2 "
                        "(bytes then count one per element)")
    parser.add_argument("--prefill-shape", type=int, nargs=2, default=[4, 4096])
    parser.add_argument("--block-m", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--block-n-prefill", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--warps-prefill", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--cache-block-sizes", type=int, nargs="+", default=[16, 64],
                        help="KV cache blocks of the prefill cases (32+: the TMA kernel on "
                        "Hopper)")
    parser.add_argument("--gluon-prefill", action="store_true",
                        help="prefill: also sweep the warp-specialized Gluon kernel "
                        "(kernels/gluon_prefill_attention.py; run its GPU tests first)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    limits = measure_limits(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy {limits['copy_bandwidth_gbps']:.0f} GB/s, "
          f"bf16 matmul {limits['bf16_matmul_tflops']:.0f} TFLOP/s, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    out = dict(device=torch.cuda.get_device_name(), limits=limits)
    if "decode" in args.kinds:
        out["decode"] = decode_cases(args, limits["copy_bandwidth_gbps"])
    if "prefill" in args.kinds:
        out["prefill"] = prefill_cases(args)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
