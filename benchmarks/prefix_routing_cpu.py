"""Prefix-cache routing on the CPU: 2 schedulers x 2 workers under shared-prefix traffic,
one stack per routing policy, against one scheduler with one worker holding everything.

Workload (gridllm.bench.prefix_workload): 80% of the requests start with one of 16 long
prefixes (then a unique suffix), the rest are unique; Poisson arrivals; greedy, a few
output tokens each. The model is a small random-weight Llama written to a temp directory
(hidden 256, 4 layers: a long prefill costs ~10x a short one on the CPU, so cache hits
show in TTFT), unless --model is given. Each configuration gets a fresh stack (cold
caches) and a short warm-up of unrelated prompts; the hit rate is the prefix-cache hits
over lookups (prompt tokens) of the timed requests, from GetServerStats.

Usage: ``python benchmarks/prefix_routing_cpu.py [--num-requests 80] [--request-rate 1.5]
[--output result.json]`` (about 2 minutes per configuration on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

# The repo root first: `kernels` must be the package, not benchmarks/kernels.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench.datasets import BenchRequest  # noqa: E402
from gridllm.bench.metrics import RequestRecord, compute_serve_metrics, summarize  # noqa: E402
from gridllm.bench.prefix_workload import (  # noqa: E402
    SharedPrefixWorkload,
    shared_prefix_requests,
)
from gridllm.bench.report import format_table, machine_info, write_json  # noqa: E402
from gridllm.bench.serve import ServeConfig, _run_requests, arrival_delays  # noqa: E402

# (label, schedulers, workers per scheduler, routing policy).
CONFIGS = [("1 x 1, everything in one cache", 1, 1, "cache_aware"),
           ("1 x 4, one scheduler sees every cache", 1, 4, "cache_aware"),
           ("2 x 2, round_robin", 2, 2, "round_robin"),
           ("2 x 2, least_load", 2, 2, "least_load"),
           ("2 x 2, cache_aware", 2, 2, "cache_aware")]


def write_model(path: str, hidden: int, num_layers: int) -> str:
    """A random-weight Llama (vocab 512, no tokenizer: token-id prompts) in ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


async def _stats(endpoint: str):
    from gridllm.client import AsyncClient

    async with AsyncClient(endpoint) as client:
        return await client.server_stats()


async def _send(client, request: BenchRequest, record: RequestRecord) -> int:
    """One request, timestamped as gridllm.bench.serve does; returns its cached tokens."""
    from gridllm.common.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
    record.send_time = time.perf_counter()
    num_cached = 0
    try:
        async for chunk in client.generate_stream(sampling_params=params,
                                                  prompt_token_ids=request.prompt_token_ids,
                                                  return_token_ids=True):
            if chunk.token_ids:
                record.chunk_times.append(time.perf_counter())
                record.chunk_num_tokens.append(len(chunk.token_ids))
            if chunk.usage is not None:
                num_cached = chunk.usage.cached_tokens
        record.end_time = time.perf_counter()
    except Exception as exc:  # noqa: BLE001 - counted as failed
        record.error = repr(exc)
    return num_cached


async def _run(endpoint: str, requests: list[BenchRequest], warmup: list[BenchRequest],
               rate: float, seed: int):
    from gridllm.client import AsyncClient

    async with AsyncClient(endpoint) as client:
        await _run_requests(client, warmup, ServeConfig(endpoint, num_prompts=len(warmup),
                                                        request_rate=4.0, use_tqdm=False))
        before = await client.server_stats()
        records = [RequestRecord(r.input_len, r.output_len, 0.0) for r in requests]
        start = time.perf_counter()
        tasks = []
        for request, record, delay in zip(requests, records,
                                          arrival_delays(len(requests), rate, seed),
                                          strict=True):
            tasks.append(asyncio.create_task(_send(client, request, record)))
            await asyncio.sleep(delay)
        cached = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        after = await client.server_stats()
    return records, cached, duration, before, after


def run_config(model: str, num_schedulers: int, num_workers: int, policy: str,
               requests: list[BenchRequest], warmup: list[BenchRequest], args) -> dict:
    from gridllm.common.config import CacheConfig, SchedulerConfig
    from gridllm.launcher import LocalStack, StackConfig
    from router.server import RouterOptions
    from scheduler_svc.server import SchedulerServiceConfig

    config = StackConfig(
        model=model, num_schedulers=num_schedulers, num_workers=num_workers, port=0,
        cache_config=CacheConfig(num_kv_blocks=args.num_kv_blocks),
        scheduler_options=SchedulerServiceConfig(scheduler_config=SchedulerConfig(
            max_num_seqs=32)),
        router_options=RouterOptions(model=model, routing_policy=policy),
        env={"OMP_NUM_THREADS": "1"}, stop_grace_s=3.0)
    with LocalStack(config) as stack:
        records, cached, duration, before, after = asyncio.run(
            _run(stack.endpoint, requests, warmup, args.request_rate, args.seed))
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    metrics = compute_serve_metrics(records, duration)
    # TTFT of the requests served from the cache (at least half the prompt) and the rest.
    split = {"hit": [], "miss": []}
    for record, num_cached, request in zip(records, cached, requests, strict=True):
        if record.is_success and record.chunk_times:
            kind = "hit" if num_cached * 2 >= request.input_len else "miss"
            split[kind].append(record.chunk_times[0] - record.send_time)
    return {"schedulers": num_schedulers, "workers_per_scheduler": num_workers,
            "policy": policy, "hit_rate": hits / queries if queries else 0.0,
            "prefix_cache_hits": hits, "prefix_cache_queries": queries,
            "num_hit_requests": len(split["hit"]),
            "ttft_hit_ms": summarize(split["hit"]), "ttft_miss_ms": summarize(split["miss"]),
            **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: a random Llama, see above")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=80)
    parser.add_argument("--num-prefixes", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--shared-fraction", type=float, default=0.8)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--request-rate", type=float, default=1.5)
    parser.add_argument("--num-kv-blocks", type=int, default=2048,
                        help="per worker: room for every prefix (routing, not capacity, "
                        "decides the hits)")
    parser.add_argument("--only", default=None,
                        help="comma-separated policies (round_robin,least_load,cache_aware) "
                        "and/or single1, single4 (one scheduler with 1 or 4 workers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="prefix-routing-")
    model = args.model or write_model(os.path.join(workdir, "model"), args.hidden_size,
                                      args.num_layers)
    workload = SharedPrefixWorkload(
        num_requests=args.num_requests, num_prefixes=args.num_prefixes,
        prefix_len=args.prefix_len, suffix_len=args.suffix_len,
        shared_fraction=args.shared_fraction, output_len=args.output_len, seed=args.seed)
    requests, _ = shared_prefix_requests(workload)
    warmup, _ = shared_prefix_requests(SharedPrefixWorkload(
        num_requests=8, num_prefixes=1, prefix_len=64, suffix_len=16, shared_fraction=0.0,
        output_len=4, seed=args.seed + 1000))
    selected = set(args.only.split(",")) if args.only else None
    results = []
    for label, num_schedulers, num_workers, policy in CONFIGS:
        key = f"single{num_workers}" if num_schedulers == 1 else policy
        if selected is not None and key not in selected:
            continue
        result = run_config(model, num_schedulers, num_workers, policy, requests, warmup, args)
        result["label"] = label
        results.append(result)
        print(f"{label}: hit rate {result['hit_rate']:.3f}, TTFT p50 "
              f"{result['ttft_ms']['p50']:.0f} ms, p99 {result['ttft_ms']['p99']:.0f} ms, "
              f"failed {result['num_failed']}", flush=True)
    rows = [[r["label"], r["hit_rate"], r["num_hit_requests"], r["ttft_ms"]["p50"],
             r["ttft_ms"]["p99"], r["ttft_hit_ms"]["p50"], r["ttft_miss_ms"]["p50"],
             r["e2e_latency_ms"]["p50"], r["num_failed"]] for r in results]
    print(format_table(rows, ["configuration", "hit rate", "hit reqs", "TTFT p50", "TTFT p99",
                              "hit TTFT p50", "miss TTFT p50", "E2E p50", "failed"])
          + "\n(latencies in ms; a hit request has at least half its prompt cached)")
    write_json(args.output, {"benchmark": "prefix_routing_cpu", "machine": machine_info("cpu"),
                             "workload": vars(workload), "args": vars(args),
                             "results": results})


if __name__ == "__main__":
    main()
