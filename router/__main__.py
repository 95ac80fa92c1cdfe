"""``python -m router --model M (--scheduler HOST:PORT ... | --redis-url URL) [--port 50051]``."""

from __future__ import annotations

import argparse
import asyncio
import logging

from gridllm.common.logger import configure_logging
from router.server import RouterOptions, RouterServer

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    p.add_argument("--scheduler", action="append", default=[], metavar="HOST:PORT",
                   help="a scheduler to route to (repeat for several); none: discover the "
                        "schedulers registered in --redis-url")
    p.add_argument("--model", required=True,
                   help="model name or path served by the workers (its tokenizer is loaded)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=50051, help="port to bind (0: a free one)")
    p.add_argument("--redis-url", default=None,
                   help="Redis with the prefix-hash index (cache-aware routing) and the "
                        "scheduler registry")
    p.add_argument("--scheduler-wait", type=float, default=60.0,
                   help="seconds a request waits for a scheduler to come (back)")
    p.add_argument("--max-resubmits", type=int, default=3,
                   help="resubmissions of a request whose scheduler died")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain on SIGTERM")
    p.add_argument("--log-level", default=None, help="default: GRIDLLM_LOGGING_LEVEL or INFO")
    args = p.parse_args(argv)
    if not args.scheduler and not args.redis_url:
        p.error("give --scheduler HOST:PORT (repeatable) or --redis-url to discover schedulers")
    return args


async def _serve(args: argparse.Namespace) -> None:
    options = RouterOptions(model_name=args.model, scheduler_wait_s=args.scheduler_wait,
                            max_resubmits=args.max_resubmits)
    server = RouterServer(args.scheduler, args.model, args.tokenizer, args.redis_url, options)
    await server.start(f"{args.host}:{args.port}")
    await server.serve_until_signal(args.grace)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
