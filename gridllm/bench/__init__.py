"""Benchmarks: ``gridllm bench throughput | serve | latency | collectives | accuracy``.

    gridllm bench throughput --model random:qwen3-0.6b --compare hf
    gridllm bench serve --target localhost:50051 --sweep 1,4,16,inf --output sweep.json
    gridllm bench latency --model random:llama3-8b
    gridllm bench collectives --model random:llama3-8b --tensor-parallel-size 2
    gridllm bench accuracy --model smollm2-135m --quantization fp8 --kv-cache-dtype fp8

``add_bench_subcommands`` adds the parsers to an argparse sub-parser set (the
``gridllm`` CLI's ``bench`` slot); ``main(argv)`` parses and runs one of them.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def add_bench_subcommands(subparsers) -> None:
    """Add ``throughput``, ``serve``, ``latency``, ``collectives`` and ``accuracy`` to
    ``subparsers``; each parser's ``func`` default runs the command (returns an exit
    code)."""
    from gridllm.bench import accuracy, collectives, latency, serve, throughput

    for name, module, command, help_text in (
            ("throughput", throughput, throughput.cmd_throughput,
             "offline throughput of the in-process engine (optionally vs transformers)"),
            ("serve", serve, serve.cmd_serve,
             "online benchmark through the router: TTFT, TPOT, ITL, E2E, throughput"),
            ("latency", latency, latency.cmd_latency,
             "batch-1 latency next to the weight-bandwidth roofline"),
            ("collectives", collectives, collectives.cmd_collectives,
             "the all-reduce time of a tensor-parallel step, over T processes"),
            ("accuracy", accuracy, accuracy.cmd_accuracy,
             "how much FP8 weights or KV cache change the model's predictions")):
        parser = subparsers.add_parser(name, help=help_text, description=module.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        parser.set_defaults(func=command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridllm bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default=None,
                        help="logging level (default: GRIDLLM_LOGGING_LEVEL or INFO)")
    add_bench_subcommands(parser.add_subparsers(dest="bench_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``gridllm bench <command> ...``; returns the exit code (2 on bad input)."""
    from gridllm.common.logger import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return args.func(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
