"""Time to first token through the stack at a low request rate, and batch-1 latency.

Checks that no request waits on Triton compilation (warm-up at worker start) or any other
stall: TTFT p90 should stay near p50. Usage: ``python benchmarks/stack_ttft.py [MODEL]``.
"""

from __future__ import annotations

import os
import sys

# The repo root first: `kernels` must be the package, not benchmarks/kernels.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench import latency, serve  # noqa: E402
from gridllm.common.logger import configure_logging  # noqa: E402


def main(model: str) -> None:
    configure_logging()
    stack = serve.launch_stack(model, max_num_seqs=64, max_num_batched_tokens=8192)
    try:
        rate = serve.run_serve(serve.ServeConfig(
            target=stack.endpoint, num_prompts=32, input_len_range=(100, 512),
            output_len_range=(32, 64), request_rate=4.0, use_tqdm=False))
        lat = latency.run_latency(latency.LatencyConfig(
            target=stack.endpoint, input_len=128, output_len=64, num_iters=3, num_warmup=1,
            use_tqdm=False))
    finally:
        stack.stop()
    for name, result in (("rate 4 req/s", rate), ("batch-1 latency", lat)):
        ttft = result["ttft_ms"]
        print(f"{model} {name}: TTFT mean {ttft['mean']:.1f} p50 {ttft['p50']:.1f} "
              f"p90 {ttft['p90']:.1f} p99 {ttft['p99']:.1f} ms; "
              f"TPOT mean {result['tpot_ms']['mean']:.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "random:qwen3-0.6b")
