"""Time every Triton kernel against its torch reference and the card's measured limits.

Run on a CUDA machine: ``python benchmarks/kernels.py --output kernels.json``. Limits are
measured in the same run by ``gridllm.bench.roofline.measure_limits`` (the estimator the
roofline of the end-to-end benchmarks uses): device-to-device copy bandwidth of a 1 GiB
tensor (read + write bytes, best of 30) and the bf16 matmul rate. Each row prints the
kernel time (median, the L2 flushed by a 256 MB read before each run), the torch reference
time, and the fraction of the limit the kernel reaches. A failing kernel prints
an error row and the script goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench.roofline import measure_limits  # noqa: E402
from kernels import torch_ref  # noqa: E402

GB = 1e9


def _l2_flush(flush: str) -> Callable[[], object]:
    """A callable that leaves the L2 holding none of the timed kernel's data: ``"read"``
    reads 256 MB (clean lines), ``"write"`` zeroes them (dirty lines, as
    ``triton.testing.do_bench`` does)."""
    if flush not in ("read", "write"):
        raise ValueError(f"flush must be 'read' or 'write', got {flush!r}.")
    buffer = torch.zeros(256 * 2 ** 20 // 4, dtype=torch.int32, device="cuda")
    if flush == "write":
        return buffer.zero_
    sink = torch.empty((), dtype=torch.int32, device="cuda")
    return lambda: torch.amax(buffer, dim=0, out=sink)


def _median_ms(run: Callable[[], object], flush: Callable[[], object], reps: int) -> float:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def bench(fn: Callable[[], object], rep_ms: int = 100, flush: str = "read") -> float:
    """Median milliseconds of ``fn`` (CUDA events) over about ``rep_ms`` of runs (10 to
    1000), L2 flushed before each run as in ``graph_bench``."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    reps = max(10, min(1000, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))
    return _median_ms(fn, _l2_flush(flush), reps)


def graph_bench(fn: Callable[[], object], reps: int = 200, flush: str = "read") -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph, as the serving path runs
    decode (no launch overhead between its kernels), L2 flushed before each replay.
    ``graph_bench_each`` is the same over several calls in one graph.

    ``flush="read"`` (default) reads 256 MB before each replay, so the replay starts with an
    L2 of clean lines, as decode attention does after the projections that read weights;
    ``"write"`` zeroes them, leaving the L2 full of dirty lines that the replay's own
    reads must first write back (at a batch-1 32k-token context that is tens of
    megabytes more traffic than the kernel's)."""
    return graph_bench_each([fn], reps, flush)


def graph_bench_each(calls: Sequence[Callable[[], object]], reps: int = 200,
                     flush: str = "read") -> float:
    """Median milliseconds a call of ``calls`` captured one after another in one CUDA
    graph (the replay's time over their number), the L2 flushed before each replay.

    A served decode step runs a layer's attention after the previous layer's kernels in
    the same graph, so a graph of one call times its launch latency (~4 us on Hopper) as
    well; calls over the layers' own caches (distinct memory, none left in L2 for the
    next) time each as served."""
    flush_l2 = _l2_flush(flush)
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    torch.cuda.synchronize()
    return _median_ms(graph.replay, flush_l2, reps) / len(calls)


def bench_slow(fn: Callable[[], object], runs: int = 3) -> float:
    """Median milliseconds for slow references (few runs, no L2 flush)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def paged_kv(batch: int, context: int, num_kv_heads: int, head_dim: int, block_size: int,
             dtype: torch.dtype):
    blocks_per_req = math.ceil(context / block_size)
    num_blocks = batch * blocks_per_req
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, device="cuda", dtype=dtype)
    value_cache = torch.randn(shape, device="cuda", dtype=dtype)
    tables = torch.randperm(num_blocks, device="cuda").view(batch, blocks_per_req)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return key_cache, value_cache, tables.to(torch.int32).contiguous(), seq_lens


def decode_problems(batch: int, context: int, layers: int = 1, num_heads: int = 32,
                    num_kv_heads: int = 8, head_dim: int = 128, block_size: int = 16,
                    dtype: torch.dtype = torch.bfloat16,
                    cache_dtype: torch.dtype | None = None) -> list[tuple]:
    """``layers`` decode problems ``(query, key_cache, value_cache, block_tables,
    seq_lens)`` of ``batch`` one-query requests over ``context`` keys, each with its own
    cache (in ``cache_dtype``, default ``dtype``), as a step's layers have."""
    problems = []
    for _ in range(layers):
        kc, vc, tables, seq = paged_kv(batch, context, num_kv_heads, head_dim, block_size,
                                       dtype)
        if cache_dtype is not None:
            kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
        q = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=dtype)
        problems.append((q, kc, vc, tables, seq))
    return problems


def bench_decode(limits, batch=64, context=4096, num_heads=32, num_kv_heads=8,
                 head_dim=128, block_size=16, with_ref=True, in_graph=False, layers=1):
    """``layers`` > 1 (with ``in_graph``): that many calls, each over its own cache, in one
    graph, timed a call (``graph_bench_each``)."""
    from kernels.paged_decode_attention import paged_decode_attention

    dtype = torch.bfloat16
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    problems = decode_problems(batch, context, layers, num_heads, num_kv_heads, head_dim,
                               block_size, dtype)
    calls = [lambda q=q, kv=kv: paged_decode_attention(q, *kv, qsl, head_dim ** -0.5)
             for q, *kv in problems]
    q, kc, vc, tables, seq = problems[0]
    args = (q, kc, vc, tables, seq, qsl, head_dim ** -0.5)
    if in_graph:
        ms = graph_bench_each(calls)
    elif layers == 1:
        ms = bench(calls[0])
    else:
        raise ValueError("layers > 1 times calls in one CUDA graph: pass in_graph=True")
    ref_ms = bench_slow(lambda: torch_ref.paged_attention(*args)) if with_ref else None
    nbytes = 2 * batch * context * num_kv_heads * head_dim * dtype.itemsize \
        + 2 * q.numel() * dtype.itemsize
    gbps = nbytes / (ms * 1e-3) / GB
    return dict(ms=ms, ref_ms=ref_ms, metric=f"{gbps:.0f} GB/s",
                pct_of_limit=100 * gbps / limits["copy_bandwidth_gbps"], limit="copy bandwidth",
                goal_pct=95 if batch >= 64 else 85)


def prefill_problem(num_seqs: int, seq_len: int, num_heads: int, head_dim: int,
                    dtype: torch.dtype):
    """A causal prefill of ``num_seqs`` x ``seq_len`` tokens: the packed queries, their
    ``query_start_loc``, its FLOPs, and torch's SDPA on the same shapes (cuDNN's or
    flash's kernel, as torch picks) over contiguous, unpaged tensors, for context."""
    q = torch.randn(num_seqs * seq_len, num_heads, head_dim, device="cuda", dtype=dtype)
    qsl = torch.arange(0, num_seqs * seq_len + 1, seq_len, dtype=torch.int32, device="cuda")
    flops = num_seqs * 4 * num_heads * head_dim * seq_len * (seq_len + 1) / 2
    qs = q.view(num_seqs, seq_len, num_heads, head_dim).transpose(1, 2)
    ks = torch.randn(num_seqs, num_heads, seq_len, head_dim, device="cuda", dtype=dtype)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qs, ks, ks, is_causal=True)

    return q, qsl, flops, sdpa


def bench_prefill(limits, num_seqs=4, seq_len=4096, num_heads=32, num_kv_heads=8,
                  head_dim=128, block_size=16):
    from kernels.prefill_attention import prefill_attention, uses_tma

    dtype = torch.bfloat16
    kc, vc, tables, seq = paged_kv(num_seqs, seq_len, num_kv_heads, head_dim, block_size,
                                   dtype)
    q, qsl, flops, sdpa = prefill_problem(num_seqs, seq_len, num_heads, head_dim, dtype)
    args = (q, kc, vc, tables, seq, qsl, head_dim ** -0.5)
    # As a step's layers share it: the Gluon kernel's query tiles built once.
    cache = {}
    # No one-query request: the engine skips the split to the decode kernel, as here.
    ms = bench(lambda: prefill_attention(*args, max_query_len=seq_len, batch_cache=cache,
                                         split_one_token=False), rep_ms=300)
    ref_ms = bench_slow(lambda: torch_ref.paged_attention(*args), runs=1)
    tflops = flops / (ms * 1e-3) / 1e12
    sdpa_ms = bench(sdpa, rep_ms=300)
    sdpa_tflops = flops / (sdpa_ms * 1e-3) / 1e12
    metric = f"{tflops:.0f} TFLOP/s, {tflops / sdpa_tflops:.2f}x SDPA"
    return dict(ms=ms, ref_ms=ref_ms, metric=metric,
                pct_of_limit=100 * tflops / limits["bf16_matmul_tflops"],
                limit="bf16 matmul", goal="1.0x torch SDPA, 550 TFLOP/s", tflops=tflops,
                torch_sdpa_contiguous_TFLOPs=sdpa_tflops,
                tma=uses_tma(q, kc, vc, seq_len))


def bench_rms_norm(limits, num_tokens=16384, hidden=4096, with_residual=True):
    from kernels.rms_norm import rms_norm

    dtype = torch.bfloat16
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=dtype)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    r = torch.randn_like(x) if with_residual else None
    ms = bench(lambda: rms_norm(x, w, 1e-6, r))
    ref_ms = bench(lambda: torch_ref.rms_norm(x, w, 1e-6, r))
    nbytes = (4 if with_residual else 2) * x.numel() * dtype.itemsize
    gbps = nbytes / (ms * 1e-3) / GB
    return dict(ms=ms, ref_ms=ref_ms, metric=f"{gbps:.0f} GB/s",
                pct_of_limit=100 * gbps / limits["copy_bandwidth_gbps"], limit="copy bandwidth",
                goal_pct=80)


def bench_kv_write(limits, num_tokens=16384, num_kv_heads=8, head_dim=128, block_size=16):
    from kernels.kv_cache_write import write_kv_cache

    dtype = torch.bfloat16
    num_blocks = 2 * num_tokens // block_size
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    kc = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    ms = bench(lambda: write_kv_cache(k, v, kc, vc, slots))
    ref_ms = bench(lambda: torch_ref.write_kv_cache(k, v, kc, vc, slots))
    gbps = 4 * k.numel() * dtype.itemsize / (ms * 1e-3) / GB
    return dict(ms=ms, ref_ms=ref_ms, metric=f"{gbps:.0f} GB/s",
                pct_of_limit=100 * gbps / limits["copy_bandwidth_gbps"], limit="copy bandwidth",
                goal_pct=80)


def bench_silu_and_mul(limits, num_tokens=4096, intermediate=14336):
    from kernels.silu_and_mul import silu_and_mul

    x = torch.randn(num_tokens, 2 * intermediate, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: silu_and_mul(x))
    ref_ms = bench(lambda: torch_ref.silu_and_mul(x))
    gbps = 1.5 * x.numel() * 2 / (ms * 1e-3) / GB
    return dict(ms=ms, ref_ms=ref_ms, metric=f"{gbps:.0f} GB/s",
                pct_of_limit=100 * gbps / limits["copy_bandwidth_gbps"], limit="copy bandwidth")


def bench_rotary(limits, num_tokens=16384, num_heads=32, num_kv_heads=8, head_dim=128):
    from kernels.rotary import rotary_embedding

    dtype = torch.bfloat16
    q = torch.randn(num_tokens, num_heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    inv = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, device="cuda") / head_dim))
    freqs = torch.outer(torch.arange(8192, device="cuda").float(), inv)
    cache = torch.cat((freqs.cos(), freqs.sin()), -1)
    pos = torch.randint(0, 8192, (num_tokens,), device="cuda")
    ms = bench(lambda: rotary_embedding(pos, q, k, cache))
    ref_ms = bench(lambda: torch_ref.rotary_embedding(pos, q, k, cache))
    gbps = 2 * (q.numel() + k.numel()) * dtype.itemsize / (ms * 1e-3) / GB
    return dict(ms=ms, ref_ms=ref_ms, metric=f"{gbps:.0f} GB/s",
                pct_of_limit=100 * gbps / limits["copy_bandwidth_gbps"], limit="copy bandwidth")


def bench_sampling(limits, batch=256, vocab=128256):
    from kernels.sampling import sample

    logits = 4 * torch.randn(batch, vocab, device="cuda")
    temp = torch.full((batch,), 0.8, device="cuda")
    top_k = torch.full((batch,), 50, dtype=torch.int32, device="cuda")
    top_p = torch.full((batch,), 0.9, device="cuda")
    min_p = torch.zeros(batch, device="cuda")
    seeds = torch.arange(batch, device="cuda")
    offsets = torch.zeros(batch, dtype=torch.int64, device="cuda")
    workspace = torch.empty(batch, vocab, device="cuda")

    def kernel():
        return sample(logits, temp, top_k, top_p, min_p, seeds, offsets, workspace=workspace)

    def reference():
        filtered = torch_ref.filter_logits(logits / temp[:, None], top_k, top_p, min_p)
        return torch.multinomial(torch.softmax(filtered, -1), 1)

    ms = bench(kernel)
    ref_ms = bench(reference)
    return dict(ms=ms, ref_ms=ref_ms, metric=f"{ref_ms / ms:.1f}x vs torch",
                pct_of_limit=None, limit="torch reference", goal="5x")


# Calls a graph in the "layers a graph" rows: enough that the graph's launch (~4 us) is a
# small part of each.
LAYERS = 8

BENCHES = [
    ("paged decode attention b64 ctx4096 bf16", bench_decode),
    # Small batches run from a CUDA graph, as decode is served: at ~30-120 us a kernel pair
    # launched from Python would time the launches.
    *((f"paged decode attention b{b} ctx32768 (split-KV, CUDA graph)",
       lambda lim, b=b: bench_decode(lim, batch=b, context=32768, with_ref=False,
                                     in_graph=True)) for b in (1, 2, 4)),
    # ... and as a decode step runs them: one graph holds a call a layer, each over its own
    # cache, so a call's time no longer includes the graph's launch.
    *((f"paged decode attention b{b} ctx32768 (split-KV, {LAYERS} layers a graph)",
       lambda lim, b=b: bench_decode(lim, batch=b, context=32768, with_ref=False,
                                     in_graph=True, layers=LAYERS)) for b in (1, 2, 4)),
    ("prefill attention 4x4096 causal bf16", bench_prefill),
    # Blocks of 64 tokens: the TMA kernel on Hopper (blocks of 16 take the pointer kernel).
    ("prefill attention 4x4096 causal bf16 block 64",
     lambda lim: bench_prefill(lim, block_size=64)),
    ("rms_norm + residual 16384x4096 bf16", bench_rms_norm),
    ("rms_norm 16384x4096 bf16", lambda lim: bench_rms_norm(lim, with_residual=False)),
    ("kv cache write 16384 tok bf16", bench_kv_write),
    ("silu_and_mul 4096x14336 bf16", bench_silu_and_mul),
    ("rotary 16384 tok bf16", bench_rotary),
    ("sampling top-k/top-p 256x128256", bench_sampling),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default=None, help="write results as JSON here")
    parser.add_argument("--only", default=None, help="run benches whose name has this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU")
    started = time.time()
    results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
               "torch": torch.__version__, "limits": {}, "kernels": {}}
    import triton

    results["triton"] = triton.__version__
    # The same estimator as the roofline of `gridllm bench latency|throughput`.
    limits = measure_limits(torch.device("cuda"))
    results["limits"] = limits
    print(f"{results['device']}: copy {limits['copy_bandwidth_gbps']:.0f} GB/s, "
          f"bf16 matmul {limits['bf16_matmul_tflops']:.0f} TFLOP/s")
    print(f"{'kernel':64s} {'ms':>9s} {'torch ms':>9s} {'metric':>28s} {'% limit':>8s}")
    for name, fn in BENCHES:
        if args.only and args.only not in name:
            continue
        try:
            row = fn(limits)
            pct = row.get("pct_of_limit")
            ref = row.get("ref_ms")
            print(f"{name:64s} {row['ms']:9.3f} "
                  f"{(f'{ref:9.3f}' if ref is not None else '-'):>9s} {row['metric']:>28s} "
                  f"{(f'{pct:7.1f}%' if pct is not None else '-'):>8s}")
        except Exception as exc:  # keep going: one broken kernel must not hide the rest
            row = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{name:64s} ERROR {row['error'][:200]}")
            traceback.print_exc(limit=3)
        results["kernels"][name] = row
        torch.cuda.empty_cache()
    results["wall_s"] = time.time() - started
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    print(f"done in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
