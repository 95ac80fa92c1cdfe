"""``python -m worker_svc --model M [--port 0] [--redis-url URL]``: serve one worker.

Loads the model, sizes its KV cache, and registers in Redis for schedulers to find.
"""

from __future__ import annotations

import argparse

from gridllm.common.cli_args import add_arguments, from_args
from gridllm.common.config import (
    WORKER_MODEL_EXCLUDED,
    WORKER_SIZING_FIELDS,
    CacheConfig,
    ModelConfig,
    SchedulerConfig,
)
from gridllm.common.service_main import serve_main, service_parser
from gridllm.common.tls import TlsOptions
from worker_svc.server import WorkerOptions, WorkerServer


def build_parser() -> argparse.ArgumentParser:
    parser = service_parser("python -m worker_svc", __doc__, grace_s=5.0)
    add_arguments(parser.add_argument_group("service"), WorkerOptions)
    add_arguments(parser.add_argument_group("model"), ModelConfig,
                  exclude=WORKER_MODEL_EXCLUDED)
    add_arguments(parser.add_argument_group("KV cache"), CacheConfig)
    add_arguments(parser.add_argument_group("batch sizing"), SchedulerConfig,
                  only=WORKER_SIZING_FIELDS)
    add_arguments(parser.add_argument_group("TLS"), TlsOptions)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_server(args: argparse.Namespace) -> WorkerServer:
    model_config = from_args(ModelConfig, args, skip_tokenizer_init=True)
    return WorkerServer(model_config, from_args(CacheConfig, args),
                        from_args(SchedulerConfig, args),
                        from_args(WorkerOptions, args, tls=from_args(TlsOptions, args)))


def main(argv: list[str] | None = None) -> None:
    serve_main(build_parser(), build_server, argv)


if __name__ == "__main__":
    main()
