"""The ``main`` every service process shares: flags, logging, build, serve until SIGTERM.

    parser = service_parser("python -m worker_svc", __doc__, grace_s=5.0)
    add_arguments(parser, WorkerOptions)           # the service's own flags
    serve_main(parser, build_server, argv)         # build_server(args) -> a server

A server has ``async start()`` and ``async serve_until_signal(grace)``. A ValueError while
building it (a bad flag value, named by the config's check) is a one-line usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from typing import Any

from gridllm.common.heap import freeze_startup_objects
from gridllm.common.logger import LOG_FORMATS, configure_logging
from gridllm.common.redis_client import RedisAuthError
from gridllm.common.tracing import configure_tracing

# A service's exit status when Redis refused its credentials.
EXIT_REDIS_AUTH = 3


def service_parser(prog: str, description: str | None, grace_s: float
                   ) -> argparse.ArgumentParser:
    """A parser with the flags every service has: ``--grace``, ``--log-level`` and
    ``--log-format``."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grace", type=float, default=grace_s, metavar="S",
                        help=f"seconds to drain in-flight calls on SIGTERM (default: {grace_s})")
    parser.add_argument("--log-level", default=None,
                        help="logging level (default: GRIDLLM_LOGGING_LEVEL or INFO)")
    parser.add_argument("--log-format", default=None, choices=LOG_FORMATS,
                        help="text, or json: one JSON object per line (default: "
                             "GRIDLLM_LOG_FORMAT or text)")
    return parser


def serve_main(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace], Any],
               argv: list[str] | None = None) -> None:
    """Parse ``argv``, configure logging, build the server and serve until SIGTERM/SIGINT."""
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as exc:
        parser.error(str(exc))
    # "python -m scheduler_svc" -> the span's service "gridllm-scheduler_svc".
    configure_tracing(f"gridllm-{parser.prog.split()[-1]}")
    asyncio.run(_serve(parser, build, args))


async def _serve(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace], Any],
                 args: argparse.Namespace) -> None:
    # Built inside the event loop: grpc.aio servers bind to the loop they are made in.
    try:
        server = build(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        await server.start()
    except RedisAuthError as exc:
        # Final: a restart would be refused again. One clear line, no traceback.
        logging.getLogger(parser.prog).error("%s", exc)
        raise SystemExit(EXIT_REDIS_AUTH) from None
    freeze_startup_objects()
    await server.serve_until_signal(args.grace)
