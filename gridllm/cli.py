"""``gridllm``: run the local stack, call it, or generate in-process.

    gridllm up [--model M] [--workers N] [--port 50051] [--http-port 8000] [--redis-url URL]
    gridllm generate [--target HOST[:PORT]] "prompt"
    gridllm run [--model M] "prompt"
    gridllm bench throughput|serve|latency|collectives|accuracy ...
    gridllm --version

``gridllm up --help`` lists every engine and service setting with its default.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

from gridllm.common.cli_args import add_arguments, args_dict, from_args
from gridllm.common.config import (
    DEFAULT_HTTP_PORT,
    DEFAULT_MODEL,
    DEFAULT_ROUTER_PORT,
    WORKER_MODEL_EXCLUDED,
    CacheConfig,
    ModelConfig,
    SchedulerConfig,
)
from gridllm.common.logger import LOG_FORMATS, configure_logging
from gridllm.launcher import (
    STACK_SET_ROUTER_FIELDS,
    STACK_SET_SCHEDULER_FIELDS,
    STACK_SET_WORKER_FIELDS,
    LocalStack,
    RouterOptions,
    SchedulerServiceConfig,
    StackConfig,
    WorkerOptions,
)
from gridllm.supervisor import RestartPolicy

logger = logging.getLogger(__name__)

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
_EXIT_INTERRUPTED = 128 + signal.SIGINT
# Seconds between the launcher's looks at its children.
_SUPERVISE_INTERVAL_S = 0.5


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the chat template")


def version() -> str:
    """The installed distribution's version (the package's own when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("gridllm")
    except PackageNotFoundError:
        from gridllm import __version__

        return __version__


def _parser(sub, name: str, help_text: str, description: str | None = None):
    return sub.add_parser(name, help=help_text, description=description or help_text,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_up_arguments(up: argparse.ArgumentParser) -> None:
    """The stack's flags, then every engine and service setting it passes on."""
    stack = up.add_argument_group("stack")
    add_arguments(stack, StackConfig, defaults={"http_port": DEFAULT_HTTP_PORT})
    add_arguments(stack, RestartPolicy)
    add_arguments(up.add_argument_group("model (every worker)"), ModelConfig,
                  exclude=("model", *WORKER_MODEL_EXCLUDED))
    add_arguments(up.add_argument_group("KV cache (every worker)"), CacheConfig)
    add_arguments(up.add_argument_group("scheduling"), SchedulerConfig)
    services = up.add_argument_group("services")
    add_arguments(services, SchedulerServiceConfig, exclude=STACK_SET_SCHEDULER_FIELDS)
    # The scheduler's --heartbeat-ttl serves the workers too.
    add_arguments(services, WorkerOptions, exclude=(*STACK_SET_WORKER_FIELDS, "heartbeat_ttl"))
    add_arguments(services, RouterOptions, exclude=STACK_SET_ROUTER_FIELDS)


def _describe_fleet(config: StackConfig) -> str:
    if config.num_schedulers == 1:
        return f"{config.num_workers} worker(s)"
    return (f"{config.num_schedulers} schedulers x {config.num_workers} worker(s)")


def stack_config_from_args(args: argparse.Namespace) -> StackConfig:
    """The StackConfig of parsed ``gridllm up`` flags (ValueError naming a bad one)."""
    scheduler_options = from_args(SchedulerServiceConfig, args,
                                  exclude=STACK_SET_SCHEDULER_FIELDS,
                                  scheduler_config=from_args(SchedulerConfig, args))
    return from_args(
        StackConfig, args, restart_policy=from_args(RestartPolicy, args),
        model_config=from_args(ModelConfig, args, exclude=WORKER_MODEL_EXCLUDED),
        cache_config=from_args(CacheConfig, args), scheduler_options=scheduler_options,
        worker_options=from_args(WorkerOptions, args, exclude=STACK_SET_WORKER_FIELDS),
        router_options=from_args(RouterOptions, args, exclude=STACK_SET_ROUTER_FIELDS,
                                 model=args.model))


def _add_engine_arguments(run: argparse.ArgumentParser) -> None:
    # The engine's seed is left at its default: --seed is the request's (sampling) seed.
    add_arguments(run.add_argument_group("model"), ModelConfig, exclude=("seed",),
                  defaults={"model": DEFAULT_MODEL})
    add_arguments(run.add_argument_group("KV cache"), CacheConfig)
    add_arguments(run.add_argument_group("scheduling"), SchedulerConfig)


def _add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    from gridllm.bench import add_bench_subcommands

    commands = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    add_bench_subcommands(commands)
    # `gridllm bench --help` shows each command's flags, not only their names.
    bench.epilog = "\n".join(["commands' flags (`gridllm bench COMMAND --help` explains them):"]
                             + [parser.format_usage().strip()
                                for parser in commands.choices.values()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridllm", description="gridllm LLM inference server")
    parser.add_argument("--version", action="version", version=f"gridllm {version()}")
    parser.add_argument("--log-level", default=None,
                        help="logging level (default: GRIDLLM_LOGGING_LEVEL or INFO)")
    parser.add_argument("--log-format", default=None, choices=LOG_FORMATS,
                        help="text, or json: one JSON object per line; `up` passes it on to "
                             "every service (default: GRIDLLM_LOG_FORMAT or text)")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_up_arguments(_parser(sub, "up", "start Redis, scheduler, workers and router locally"))

    gen = _parser(sub, "generate", "stream a completion from a running server")
    gen.add_argument("prompt")
    gen.add_argument("--target", default=f"localhost:{DEFAULT_ROUTER_PORT}",
                     help=f"router HOST[:PORT] (port {DEFAULT_ROUTER_PORT} when left out; "
                          "http://HOST:PORT also accepted)")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    gen.add_argument("--tls-ca", default=None, metavar="FILE",
                     help="dial the router over TLS, trusting this CA certificate (PEM; "
                          "`gridllm up --tls` prints it)")
    gen.add_argument("--api-key", default=None,
                     help="the router's API key (default: $GRIDLLM_API_KEY, or none)")
    _add_sampling_flags(gen)

    run = _parser(sub, "run", "generate in-process with gridllm.LLM (no services)")
    run.add_argument("prompt")
    _add_sampling_flags(run)
    _add_engine_arguments(run)

    _add_bench_arguments(_parser(
        sub, "bench", "benchmarks: throughput | serve | latency | collectives | accuracy"))
    return parser


def _sampling_params(args: argparse.Namespace):
    from gridllm.common.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)


# ----------------------------------------------------------------------- commands
class _Terminate(Exception):
    """SIGTERM turned into an exception, so ``finally`` blocks stop the children."""


def _raise_terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminate()


def cmd_up(args: argparse.Namespace) -> int:
    from gridllm.common.presets import check_model

    # Before anything starts: a typo must not cost a Redis, a scheduler and a traceback.
    check_model(args.model, "--model")
    config = stack_config_from_args(args)
    if args.log_format is not None:
        config.env.setdefault("GRIDLLM_LOG_FORMAT", args.log_format)
    stack = LocalStack(config)
    # SIGTERM to the launcher alone must stop the children as Ctrl-C does; SIGINT is set
    # too because a launcher started in the background inherits it ignored.
    signal.signal(signal.SIGTERM, _raise_terminate)
    signal.signal(signal.SIGINT, _raise_terminate)
    stopped = threading.Event()
    try:
        stack.start()
        # stdout is the interface here (scripts read the endpoint), not a log line.
        http = f" and {stack.http_endpoint}/v1 (OpenAI API)" if stack.http_endpoint else ""
        tls = f"; TLS, CA {stack.tls.ca_file}" if stack.tls is not None else ""
        print(f"gridllm serving {config.model} at {stack.endpoint}{http} "
              f"({_describe_fleet(config)}; logs in {stack.log_dir}{tls})", flush=True)
        while not stopped.wait(_SUPERVISE_INTERVAL_S):
            if stack.supervisor is not None:
                stack.supervisor.check()  # restarts the dead; CrashLoopError gives up
            else:
                for process in stack.processes:
                    process.check_running()
    except _Terminate:
        logger.info("stopping the stack")
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        # A second signal must not interrupt the shutdown half-way.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
    return 0


def parse_target(target: str) -> str:
    """A router address as gRPC dials it: ``host`` gets the default port, ``http://host:port``
    loses its scheme; ValueError (naming --target) for what cannot be a plaintext gRPC address.
    """
    text = target.strip()
    scheme, sep, rest = text.partition("://")
    if sep:
        if scheme.lower() == "https":
            raise ValueError(f"--target {target!r}: a target is HOST:PORT, dialed in "
                             "plaintext gRPC, not TLS, unless --tls-ca FILE is given.")
        if scheme.lower() != "http":
            return text  # gRPC's own schemes (dns:///, unix://, ipv4:) pass through
        text = rest.rstrip("/")
        if "/" in text:
            raise ValueError(f"--target {target!r}: a gRPC address has no path; "
                             "use HOST:PORT or http://HOST:PORT.")
    elif text.startswith("unix:") or text.startswith("dns:"):
        return text
    if not text:
        raise ValueError(f"--target {target!r}: expected HOST[:PORT].")
    host, colon, port = text.rpartition(":")
    is_bare_ipv6 = text.count(":") > 1 and not text.startswith("[")
    if not colon or "]" in port or is_bare_ipv6:
        host = f"[{text}]" if is_bare_ipv6 else text
        return f"{host}:{DEFAULT_ROUTER_PORT}"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--target {target!r}: expected HOST[:PORT] with a port in 1..65535.")
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from gridllm.client import Client

    target = parse_target(args.target)
    params = _sampling_params(args)
    prompt_kwargs = ({"messages": [{"role": "user", "content": args.prompt}]} if args.chat
                     else {"prompt": args.prompt})
    try:
        with Client(target, timeout=args.timeout, tls_ca=args.tls_ca,
                    api_key=args.api_key) as client:
            for chunk in client.generate_stream(sampling_params=params, **prompt_kwargs):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        # Leaving the stream cancels the request on the server; nothing to report.
        sys.stdout.write("\n")
        return _EXIT_INTERRUPTED
    except grpc.RpcError as exc:
        sys.stdout.write("\n")
        code = exc.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE:
            logger.error("no gridllm server answers at %s (%s); start one with `gridllm up`, "
                         "or pass --target HOST:PORT", target, exc.details())  # type: ignore[attr-defined]
        else:
            logger.error("%s: %s", code.name, exc.details())  # type: ignore[attr-defined]
        return 1
    sys.stdout.write("\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gridllm.llm import LLM

    engine_kwargs = {name: value for cls in (ModelConfig, CacheConfig, SchedulerConfig)
                     for name, value in args_dict(cls, args, exclude=("model", "seed")).items()}
    llm = LLM(args.model, **engine_kwargs)
    params = _sampling_params(args)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    sys.stdout.write(outputs[0].outputs[0].text + "\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return args.func(args)


_COMMANDS = {"up": cmd_up, "generate": cmd_generate, "run": cmd_run, "bench": cmd_bench}


def _check_log_level(level: str | None) -> str | None:
    """The message for a bad --log-level (or GRIDLLM_LOGGING_LEVEL), None when it is good."""
    source = "--log-level" if level is not None else "GRIDLLM_LOGGING_LEVEL"
    value = level if level is not None else os.environ.get("GRIDLLM_LOGGING_LEVEL")
    if value is None or value.upper() in _LOG_LEVELS:
        return None
    return f"{source} must be one of {', '.join(_LOG_LEVELS)} (any case), got {value!r}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gridllm`` console script.

    Exit status: 0 done, 1 failed (a service, the server, a port in use), 2 bad input,
    130 interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check_log_level(args.log_level)
    if problem:
        # One line, as argparse reports its own errors; logging is not configured yet.
        sys.stderr.write(f"{parser.prog}: error: {problem}\n")
        return 2
    configure_logging(args.log_level, args.log_format)
    try:
        return _COMMANDS[args.command](args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    except OSError as exc:  # a port in use, an unreadable file: the message says which
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return _EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
