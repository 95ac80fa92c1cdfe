"""``python -m scheduler_svc [--port 0] [--redis-url URL] [--worker HOST:PORT ...]``.

Batches requests for the workers it finds in Redis (or is given with --worker); the limits
of each worker (max_model_len, KV blocks) come from the worker itself.
"""

from __future__ import annotations

import argparse

from gridllm.common.cli_args import add_arguments, from_args
from gridllm.common.config import SchedulerConfig
from gridllm.common.service_main import serve_main, service_parser
from gridllm.common.tls import TlsOptions
from scheduler_svc.server import SchedulerServer, SchedulerServiceConfig


def build_parser() -> argparse.ArgumentParser:
    parser = service_parser("python -m scheduler_svc", __doc__, grace_s=5.0)
    add_arguments(parser.add_argument_group("service"), SchedulerServiceConfig)
    add_arguments(parser.add_argument_group("scheduling"), SchedulerConfig)
    add_arguments(parser.add_argument_group("TLS"), TlsOptions)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_server(args: argparse.Namespace) -> SchedulerServer:
    config = from_args(SchedulerServiceConfig, args,
                       scheduler_config=from_args(SchedulerConfig, args),
                       tls=from_args(TlsOptions, args))
    return SchedulerServer(config)


def main(argv: list[str] | None = None) -> None:
    serve_main(build_parser(), build_server, argv)


if __name__ == "__main__":
    main()
