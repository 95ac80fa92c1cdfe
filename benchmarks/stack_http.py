"""HTTP (OpenAI-compatible) against gRPC through the same stack, on the same workloads.

One stack (Redis, scheduler, one worker, router serving both APIs); each workload runs with
``bench serve --backend grpc`` and ``--backend openai`` alternately (the first of the two
alternating between rounds), ``--rounds`` times each,
and the medians over the rounds are compared: output tokens/s at full load, TTFT p50 with
one request at a time, and the router's CPU time per 1000 output tokens (what the front
itself costs; unlike throughput on a shared machine, it does not move with other load).
Then ``--pairs`` single requests through each API, alternating (which goes first alternates
too), give the TTFT difference as the median of the paired differences: the load the machine
had at that moment weighs on both requests of a pair alike.

Usage: ``python benchmarks/stack_http.py [--model random:tiny] [--rounds 5] [--pairs 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import sys
import time

# The repo root first: `kernels` must be the package, not benchmarks/kernels.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402

from gridllm.bench import serve  # noqa: E402
from gridllm.bench.datasets import BenchRequest  # noqa: E402
from gridllm.bench.http_client import HttpClient  # noqa: E402
from gridllm.bench.metrics import RequestRecord  # noqa: E402
from gridllm.client import AsyncClient  # noqa: E402

_WARM_UP_PAIRS = 10


async def paired_ttft(stack, num_pairs: int, input_len: int = 128,
                      seed: int = 0) -> dict[str, list[float]]:
    """TTFT in seconds of ``num_pairs`` pairs of single requests (one through gRPC, one
    through HTTP, the order alternating; random prompts of ``input_len`` tokens), after a
    few warm-up pairs."""
    rng = random.Random(seed)
    ttft: dict[str, list[float]] = {"grpc": [], "openai": []}
    async with AsyncClient(stack.endpoint) as grpc_client, \
            HttpClient(stack.http_endpoint) as http_client:
        info = await grpc_client.model_info()
        clients = {"grpc": grpc_client, "openai": http_client}
        for i in range(_WARM_UP_PAIRS + num_pairs):
            order = ("grpc", "openai") if i % 2 else ("openai", "grpc")
            for backend in order:
                # A fresh prompt each: no prefix-cache hit for the second of a pair.
                request = BenchRequest([rng.randrange(info.vocab_size)
                                        for _ in range(input_len)], output_len=4)
                record = RequestRecord(input_len, request.output_len, 0.0)
                await serve.send_request(clients[backend], backend, info.model, request,
                                         record)
                if record.error or not record.chunk_times:
                    raise RuntimeError(f"{backend} request failed: {record.error}")
                if i >= _WARM_UP_PAIRS:
                    ttft[backend].append(record.chunk_times[0] - record.send_time)
    return ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=100,
                        help="single-request pairs for the paired TTFT difference (0: none)")
    args = parser.parse_args()
    workloads = {
        "throughput": dict(num_prompts=args.num_prompts, input_len_range=(32, 128),
                           output_len_range=(64, 256), request_rate=math.inf),
        "latency": dict(num_prompts=32, input_len_range=(128, 128), output_len_range=(16, 16),
                        max_concurrency=1),
    }
    stack = serve.launch_stack(args.model, max_num_seqs=args.num_prompts)
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        router = psutil.Process(stack.router.pid)
        for round_index in range(args.rounds):
            # Which API goes first alternates between rounds: no order effect on the medians.
            order = serve.BACKENDS if round_index % 2 == 0 else serve.BACKENDS[::-1]
            for name, workload in workloads.items():
                for backend in order:
                    config = serve.ServeConfig(target=serve.stack_target(stack, backend),
                                               backend=backend, use_tqdm=False, **workload)
                    cpu_before = sum(router.cpu_times()[:2])
                    result = serve.run_serve(config)
                    result["router_cpu_s"] = sum(router.cpu_times()[:2]) - cpu_before
                    assert result["num_failed"] == 0, result["first_errors"]
                    results.setdefault((name, backend), []).append(result)
        pairs = asyncio.run(paired_ttft(stack, args.pairs)) if args.pairs else None
    finally:
        stack.stop()

    def median(name: str, backend: str, key) -> float:
        return statistics.median(key(r) for r in results[(name, backend)])

    tok = {b: median("throughput", b, lambda r: r["output_tokens_per_s"]) for b in serve.BACKENDS}
    ttft = {b: median("latency", b, lambda r: r["ttft_ms"]["p50"]) for b in serve.BACKENDS}
    itl = {b: median("throughput", b, lambda r: r["itl_ms"]["p50"]) for b in serve.BACKENDS}
    cpu = {b: median("throughput", b,
                     lambda r: 1e6 * r["router_cpu_s"] / r["total_output_tokens"])
           for b in serve.BACKENDS}
    print(f"model {args.model}, {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"medians of {args.rounds} alternating rounds")
    for (name, backend), runs in sorted(results.items()):
        print(f"  {name:10s} {backend:6s} out tok/s "
              + " ".join(f"{r['output_tokens_per_s']:.0f}" for r in runs) + "; TTFT p50 ms "
              + " ".join(f"{r['ttft_ms']['p50']:.1f}" for r in runs))
    print(f"throughput ({args.num_prompts} prompts at once, in 32-128, out 64-256): "
          f"gRPC {tok['grpc']:.0f} out tok/s, HTTP {tok['openai']:.0f} out tok/s, "
          f"HTTP/gRPC {tok['openai'] / tok['grpc']:.3f}; ITL p50 gRPC {itl['grpc']:.2f} ms, "
          f"HTTP {itl['openai']:.2f} ms")
    print(f"router CPU per 1000 output tokens: gRPC {cpu['grpc']:.0f} ms, HTTP "
          f"{cpu['openai']:.0f} ms, HTTP/gRPC {cpu['openai'] / cpu['grpc']:.2f}")
    print(f"latency (one at a time, in 128, out 16): TTFT p50 gRPC {ttft['grpc']:.2f} ms, "
          f"HTTP {ttft['openai']:.2f} ms, added {ttft['openai'] - ttft['grpc']:+.2f} ms")
    if pairs:
        differences = [h - g for g, h in zip(pairs["grpc"], pairs["openai"], strict=True)]
        print(f"paired single requests (in 128, {args.pairs} pairs, alternating order): TTFT "
              f"p50 gRPC {1e3 * statistics.median(pairs['grpc']):.2f} ms, HTTP "
              f"{1e3 * statistics.median(pairs['openai']):.2f} ms; HTTP - gRPC per pair: "
              f"median {1e3 * statistics.median(differences):+.2f} ms, quartiles "
              + " / ".join(f"{1e3 * q:+.2f}" for q in statistics.quantiles(differences, n=4))
              + " ms")


if __name__ == "__main__":
    main()
