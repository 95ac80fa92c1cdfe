"""HTTP (OpenAI-compatible) against gRPC through the same stack, on the same workloads.

One stack (Redis, scheduler, one worker, router serving both APIs); each workload runs with
``bench serve --backend grpc`` and ``--backend openai`` alternately, ``--rounds`` times each,
and the medians over the rounds are compared: output tokens/s at full load, and TTFT p50 with
one request at a time.

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
        for _ in range(args.rounds):
            for name, workload in workloads.items():
                for backend in serve.BACKENDS:
                    config = serve.ServeConfig(target=serve.stack_target(stack, backend),
                                               backend=backend, use_tqdm=False, **workload)
                    result = serve.run_serve(config)
                    assert result["num_failed"] == 0, result["first_errors"]
                    results.setdefault((name, backend), []).append(result)
    finally:
        stack.stop()

    def median(name: str, backend: str, key) -> float:
        return statistics.median(key(r) for r in results[(name, backend)])

    tok = {b: median("throughput", b, lambda r: r["output_tokens_per_s"]) for b in serve.BACKENDS}
    ttft = {b: median("latency", b, lambda r: r["ttft_ms"]["p50"]) for b in serve.BACKENDS}
    itl = {b: median("throughput", b, lambda r: r["itl_ms"]["p50"]) for b in serve.BACKENDS}
    print(f"model {args.model}, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}, "
          f"medians of {args.rounds} alternating rounds")
    print(f"throughput ({args.num_prompts} prompts at once, in 32-128, out 64-256): "
          f"gRPC {tok['grpc']:.0f} out tok/s, HTTP {tok['openai']:.0f} out tok/s, "
          f"HTTP/gRPC {tok['openai'] / tok['grpc']:.3f}; ITL p50 gRPC {itl['grpc']:.2f} ms, "
          f"HTTP {itl['openai']:.2f} ms")
    print(f"latency (one at a time, in 128, out 16): TTFT p50 gRPC {ttft['grpc']:.2f} ms, "
          f"HTTP {ttft['openai']:.2f} ms, added {ttft['openai'] - ttft['grpc']:+.2f} ms")


if __name__ == "__main__":
    main()
