"""HTTP (OpenAI-compatible) against gRPC through the same stack, on the same workloads.

One stack (Redis, scheduler, one worker, router serving both APIs); each workload runs with
``bench serve --backend grpc`` and ``--backend openai`` alternately, ``--rounds`` times each,
and the medians over the rounds are compared: output tokens/s at full load, TTFT p50 with
one request at a time, and the router's CPU time per 1000 output tokens (what the front
itself costs; unlike throughput on a shared machine, it does not move with other load).

Usage: ``python benchmarks/stack_http.py [--model random:tiny] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

# The repo root first: `kernels` must be the package, not benchmarks/kernels.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402

from gridllm.bench import serve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=64)
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
        for _ in range(args.rounds):
            for name, workload in workloads.items():
                for backend in serve.BACKENDS:
                    config = serve.ServeConfig(target=serve.stack_target(stack, backend),
                                               backend=backend, use_tqdm=False, **workload)
                    cpu_before = sum(router.cpu_times()[:2])
                    result = serve.run_serve(config)
                    result["router_cpu_s"] = sum(router.cpu_times()[:2]) - cpu_before
                    assert result["num_failed"] == 0, result["first_errors"]
                    results.setdefault((name, backend), []).append(result)
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


if __name__ == "__main__":
    main()
