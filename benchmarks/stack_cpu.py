"""The stack on the CPU: the scheduler-to-worker round trip per step, and tokens/s through
the full stack against the in-process ``LLM`` on the same workload.

Usage: ``python benchmarks/stack_cpu.py [--model random:tiny] [--num-prompts 64]``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time

# The repo root first: `kernels` must be the package, not benchmarks/kernels.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

from gridllm.bench import serve, throughput  # noqa: E402
from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig  # noqa: E402
from gridllm.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402
from worker_svc.server import WorkerOptions, WorkerServer  # noqa: E402


async def step_round_trip_us(model: str, num_steps: int) -> dict[str, float]:
    """Empty steps over one persistent Step stream: pure transport + (de)serialisation."""
    server = WorkerServer(ModelConfig(model=model, skip_tokenizer_init=True),
                          CacheConfig(num_kv_blocks=64), SchedulerConfig(),
                          WorkerOptions())
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = worker_pb2_grpc.WorkerStub(channel).Step()
            times = []
            for step_id in range(1, num_steps + 1):
                start = time.perf_counter()
                await call.write(worker_pb2.StepRequest(step_id=step_id))
                await call.read()
                times.append((time.perf_counter() - start) * 1e6)
            await call.done_writing()
    finally:
        await server.stop(0)
    times = times[num_steps // 10:]  # drop the warm-up
    return {"median_us": statistics.median(times), "p90_us": sorted(times)[int(0.9 * len(times))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--max-steps-in-flight", type=int, default=2, choices=(1, 2),
                        help="the scheduler's step pipelining depth")
    args = parser.parse_args()
    trip = asyncio.run(step_round_trip_us(args.model, args.num_steps))
    lengths = dict(input_len_range=(32, 128), output_len_range=(64, 256))
    inproc = throughput.run_throughput(throughput.ThroughputConfig(
        model=args.model, num_prompts=args.num_prompts, max_num_seqs=args.num_prompts,
        use_tqdm=False, **lengths))["gridllm"]
    stack = serve.launch_stack(
        args.model, max_num_seqs=args.num_prompts,
        scheduler_args=["--max-steps-in-flight", str(args.max_steps_in_flight)])
    try:
        served = serve.run_serve(serve.ServeConfig(
            target=stack.endpoint, num_prompts=args.num_prompts, request_rate=math.inf,
            use_tqdm=False, **lengths))
    finally:
        stack.stop()
    ratio = served["output_tokens_per_s"] / inproc["output_tokens_per_s"]
    print(f"model {args.model}, {os.cpu_count()} CPU cores, "
          f"max_steps_in_flight={args.max_steps_in_flight}")
    print(f"scheduler->worker step round trip (empty step): median {trip['median_us']:.0f} us, "
          f"p90 {trip['p90_us']:.0f} us")
    print(f"in-process: {inproc['output_tokens_per_s']:.0f} output tok/s; stack: "
          f"{served['output_tokens_per_s']:.0f} output tok/s; stack / in-process {ratio:.2f}")


if __name__ == "__main__":
    main()
