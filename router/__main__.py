"""``python -m router --model M (--scheduler HOST:PORT ... | --redis-url URL) [--port 50051]``.

The public Generation service: validates and tokenizes requests, routes them to schedulers
(by load and prefix-cache overlap) and streams text back.
"""

from __future__ import annotations

import argparse

from gridllm.common.cli_args import add_arguments, from_args
from gridllm.common.service_main import serve_main, service_parser
from gridllm.common.tls import TlsOptions
from router.server import RouterOptions, RouterServer


def build_parser() -> argparse.ArgumentParser:
    parser = service_parser("python -m router", __doc__, grace_s=10.0)
    add_arguments(parser, RouterOptions)
    add_arguments(parser.add_argument_group("TLS"), TlsOptions)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_server(args: argparse.Namespace) -> RouterServer:
    return RouterServer(from_args(RouterOptions, args, tls=from_args(TlsOptions, args)))


def main(argv: list[str] | None = None) -> None:
    serve_main(build_parser(), build_server, argv)


if __name__ == "__main__":
    main()
