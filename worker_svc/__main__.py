"""``python -m worker_svc --model M [--port 0] [--redis-url URL]``: serve one worker."""

from __future__ import annotations

import argparse
import asyncio
import logging

from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from gridllm.common.logger import configure_logging
from worker_svc.server import WorkerOptions, WorkerServer

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker_svc", description=__doc__)
    p.add_argument("--model", required=True, help="HF directory, GGUF file or preset name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=0, help="port to bind (0: a free one)")
    p.add_argument("--advertise-host", default=None,
                   help="host schedulers dial (default: --host; the hostname if --host is 0.0.0.0)")
    p.add_argument("--redis-url", default=None, help="register here (e.g. redis://host:6379/0)")
    p.add_argument("--worker-id", default=None, help="registry id (default: a fresh uuid)")
    p.add_argument("--heartbeat-ttl", type=float, default=6.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=1 << 30,
                   help="bytes for the KV cache on CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--grace", type=float, default=5.0, help="seconds to drain on SIGTERM")
    p.add_argument("--log-level", default=None, help="default: GRIDLLM_LOGGING_LEVEL or INFO")
    return p.parse_args(argv)


def build_server(args: argparse.Namespace) -> WorkerServer:
    model_config = ModelConfig(model=args.model, dtype=args.dtype, device=args.device,
                               max_model_len=args.max_model_len,
                               attention_backend=args.attention_backend,
                               enforce_eager=args.enforce_eager, seed=args.seed,
                               skip_tokenizer_init=True)
    cache_config = CacheConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                               kv_cache_memory=args.kv_cache_memory,
                               gpu_memory_utilization=args.gpu_memory_utilization)
    max_model_len = args.max_model_len or 2048
    scheduler_config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_model_len)
    advertise = args.advertise_host
    if advertise is None and args.host in ("0.0.0.0", "::"):
        import socket

        advertise = socket.gethostname()
    options = WorkerOptions(worker_id=args.worker_id, bind_host=args.host, port=args.port,
                            advertise_host=advertise, redis_url=args.redis_url,
                            heartbeat_ttl=args.heartbeat_ttl)
    return WorkerServer(model_config, cache_config, scheduler_config, options)


async def _serve(args: argparse.Namespace) -> None:
    server = build_server(args)
    await server.start()
    await server.serve_until_signal(args.grace)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
