"""``python -m gridllm.healthcheck HOST:PORT [--service NAME]``: one gRPC health probe.

Exits 0 when the server reports SERVING, 1 otherwise (NOT_SERVING, unknown service,
unreachable, too slow). Container healthchecks run it: the image has no grpc_health_probe
binary, and this needs only grpc (no torch), so a probe costs a fraction of a second.
A service serving TLS is probed with a certificate of its deployment (``--tls-dir``) and its
role name (``--tls-server-name gridllm-worker``). With ``GRIDLLM_API_KEY`` set it sends that
key, for a router started with ``--auth-health``.
"""

from __future__ import annotations

import argparse
import sys

from gridllm.common.cli_args import add_arguments, from_args
from gridllm.common.tls import TlsOptions, blocking_channel

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gridllm.healthcheck", description=__doc__)
    p.add_argument("target", metavar="HOST:PORT", help="the server to probe")
    p.add_argument("--service", default="",
                   help="service name to ask about (default: the server as a whole)")
    p.add_argument("--timeout", type=float, default=3.0,
                   help="seconds the probe may take (connecting included)")
    add_arguments(p.add_argument_group("TLS"), TlsOptions)
    p.add_argument("--tls-server-name", default=None, metavar="NAME",
                   help="name checked in the server's certificate (e.g. gridllm-worker; "
                        "default: the target's host)")
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        p.error(f"target: expected HOST:PORT with a port in 1..65535, got {args.target!r}")
    if args.timeout <= 0:
        p.error(f"--timeout: must be > 0, got {args.timeout}")
    return args


def check(target: str, service: str = "", timeout: float = 3.0, tls: TlsOptions | None = None,
          server_name: str | None = None) -> tuple[bool, str]:
    """Ask ``target`` for the health of ``service`` (over TLS with ``tls``).

    Returns:
        ``(is_serving, what was seen)``: the status name, or the RPC error.
    """
    import os

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gridllm.common.auth import API_KEY_ENV, bearer_metadata

    with blocking_channel(target, tls, server_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            # wait_for_ready: a server still binding counts as slow, not as refused.
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service),
                               timeout=timeout, wait_for_ready=True,
                               metadata=bearer_metadata(os.environ.get(API_KEY_ENV)))
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tls = from_args(TlsOptions, args)
    except ValueError as exc:
        print(f"{args.target}: {exc}")
        return EXIT_NOT_SERVING
    is_serving, seen = check(args.target, args.service, args.timeout, tls, args.tls_server_name)
    # stdout is the interface: docker keeps the last probes' output in `docker inspect`.
    name = f" service {args.service!r}" if args.service else ""
    print(f"{args.target}{name}: {seen}")
    return EXIT_SERVING if is_serving else EXIT_NOT_SERVING


if __name__ == "__main__":
    sys.exit(main())
