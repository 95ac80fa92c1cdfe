"""``python -m scheduler_svc [--port 0] [--redis-url URL] [--worker HOST:PORT ...]``."""

from __future__ import annotations

import argparse
import asyncio
import logging

from gridllm.common.config import SchedulerConfig
from gridllm.common.logger import configure_logging
from scheduler_svc.server import SchedulerServer, SchedulerServiceConfig

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scheduler_svc", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=0, help="port to bind (0: a free one)")
    p.add_argument("--advertise-host", default=None,
                   help="host routers dial (default: --host; the hostname if --host is 0.0.0.0)")
    p.add_argument("--redis-url", default=None,
                   help="discover workers, mirror block state and register here")
    p.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                   help="a worker to drive (repeatable; besides those in Redis)")
    p.add_argument("--scheduler-id", default=None, help="registry id (default: a fresh uuid)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--scheduling-policy", default="fcfs", choices=("fcfs", "priority"))
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false")
    p.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill",
                   action="store_false")
    p.add_argument("--discovery-interval", type=float, default=1.0)
    p.add_argument("--heartbeat-ttl", type=float, default=6.0)
    p.add_argument("--max-steps-in-flight", type=int, default=2, choices=(1, 2),
                   help="2 sends step N+1 while the worker runs step N (pipelining)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to drain on SIGTERM")
    p.add_argument("--log-level", default=None, help="default: GRIDLLM_LOGGING_LEVEL or INFO")
    return p.parse_args(argv)


def build_server(args: argparse.Namespace) -> SchedulerServer:
    # max_model_len is the workers'; this one only satisfies the config's own checks.
    scheduler_config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=min(2048, args.max_num_batched_tokens),
        enable_chunked_prefill=args.enable_chunked_prefill, policy=args.scheduling_policy)
    advertise = args.advertise_host
    if advertise is None and args.host in ("0.0.0.0", "::"):
        import socket

        advertise = socket.gethostname()
    config = SchedulerServiceConfig(
        scheduler_config=scheduler_config, enable_prefix_caching=args.enable_prefix_caching,
        worker_addresses=list(args.worker), redis_url=args.redis_url,
        scheduler_id=args.scheduler_id, bind_host=args.host, port=args.port,
        advertise_host=advertise, discovery_interval=args.discovery_interval,
        heartbeat_ttl=args.heartbeat_ttl, max_steps_in_flight=args.max_steps_in_flight)
    return SchedulerServer(config)


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
