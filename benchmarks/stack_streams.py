"""Router -> scheduler transport on CPU: a Submit call per request against one Session stream
per scheduler, for many concurrent requests through a local stack (Redis, scheduler, one
worker, router) with a tiny random model.

Prints, for each path, output tokens/s (client side), the messages the scheduler wrote to
the router per step (its ``scheduler_stream_messages_total`` over ``iteration_tokens_total``
observations, scraped from its /metrics), and each service's CPU time per output token
(user + system, from /proc; where a stack at many streams spends its host time).

Usage: ``python benchmarks/stack_streams.py [--model random:tiny] [--num-prompts 128]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import urllib.request

# The repo root first: `kernels` must be the package, not benchmarks/kernels.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from gridllm.bench import serve  # noqa: E402
from gridllm.common.config import SchedulerConfig  # noqa: E402
from gridllm.common.procs import stat_fields  # noqa: E402
from gridllm.launcher import LocalStack, StackConfig  # noqa: E402
from router.server import RouterOptions  # noqa: E402
from scheduler_svc.server import SchedulerServiceConfig  # noqa: E402

STREAMS = ("submit", "session")


def scrape(port: int) -> tuple[float, float]:
    """(messages written to the routers, steps run) so far."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    messages = steps = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gridllm:scheduler_stream_messages_total":
                messages += sample.value
            elif sample.name == "gridllm:iteration_tokens_total_count":
                steps += sample.value
    return messages, steps


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0.0 where /proc cannot tell)."""
    fields = None if pid is None else stat_fields(pid)
    if not fields:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_path(stream: str, args: argparse.Namespace) -> dict:
    config = StackConfig(
        model=args.model, port=0, scheduler_metrics_port=0,
        scheduler_options=SchedulerServiceConfig(
            scheduler_config=SchedulerConfig(max_num_seqs=args.num_prompts)),
        router_options=RouterOptions(args.model, scheduler_stream=stream))
    stack = LocalStack(config)
    stack.start()
    try:
        port = stack.metrics_ports["scheduler"]
        lengths = dict(input_len_range=(args.input_len, args.input_len),
                       output_len_range=(args.output_len, args.output_len))
        # A first round warms every path (and the worker's caches); the second is measured.
        serve.run_serve(serve.ServeConfig(target=stack.endpoint, num_prompts=args.num_prompts,
                                          request_rate=math.inf, use_tqdm=False, **lengths))
        messages, steps = scrape(port)
        services = {p.name: p.pid for p in stack.processes if p.name != "redis"}
        cpu = {name: cpu_seconds(pid) for name, pid in services.items()}
        served = serve.run_serve(serve.ServeConfig(
            target=stack.endpoint, num_prompts=args.num_prompts, request_rate=math.inf,
            use_tqdm=False, seed=1, **lengths))
        cpu = {name: cpu_seconds(pid) - cpu[name] for name, pid in services.items()}
        messages_after, steps_after = scrape(port)
    finally:
        stack.stop()
    num_steps = max(steps_after - steps, 1.0)
    tokens = max(served["total_output_tokens"], 1)
    return {"output_tokens_per_s": served["output_tokens_per_s"],
            "messages": messages_after - messages, "steps": num_steps,
            "messages_per_step": (messages_after - messages) / num_steps,
            "cpu_us_per_token": {name: 1e6 * s / tokens for name, s in cpu.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--num-prompts", type=int, default=128,
                        help="requests sent at once (and the scheduler's max_num_seqs)")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--streams", nargs="+", default=list(STREAMS), choices=STREAMS)
    args = parser.parse_args()
    results = {stream: run_path(stream, args) for stream in args.streams}
    print(f"model {args.model}, {os.cpu_count()} CPU cores, {args.num_prompts} concurrent "
          f"requests, in {args.input_len} / out {args.output_len} tokens")
    for stream, result in results.items():
        print(f"{stream:8s} {result['output_tokens_per_s']:8.0f} output tok/s   "
              f"{result['messages_per_step']:7.1f} scheduler->router messages per step "
              f"({result['messages']:.0f} in {result['steps']:.0f} steps)")
        print("         CPU us per output token: " + ", ".join(
            f"{name} {us:.0f}" for name, us in result["cpu_us_per_token"].items()))
    if len(results) == 2:
        ratio = (results["session"]["output_tokens_per_s"]
                 / results["submit"]["output_tokens_per_s"])
        print(f"session / submit: {ratio:.2f}x output tok/s")


if __name__ == "__main__":
    main()
