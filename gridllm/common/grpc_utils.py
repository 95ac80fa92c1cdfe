"""Server plumbing shared by the router, scheduler and worker services.

A ``grpc.aio`` server with explicit message size limits, the standard ``grpc.health.v1``
service, server reflection, an interceptor mapping Python exceptions to status codes, and a
SIGTERM handler that stops accepting calls and drains in-flight ones within a grace period.

Health answers two questions. *Readiness* (the service ``""`` and each service's own name):
SERVING only while the service takes new work (NOT_SERVING until it says it is ready, when it
loses what it needs, and from the moment it starts draining). *Liveness* (the service
``liveness``): SERVING while the process can do its work at all; a supervisor restarts a
process that fails it (or stops answering).
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

logger = logging.getLogger(__name__)

# Prompts of a full context plus logprobs fit comfortably; larger messages are a bug.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Calls gRPC holds while the handlers catch up. Past its own defaults (1,000, then 3,000
# calls, or 30 s held) it cancels calls with a bare CANCELLED before any handler sees them: a
# burst of a few thousand streams lost some, and a router took its scheduler for dead. With
# these, a held call is answered by the service's admission control (RESOURCE_EXHAUSTED with
# a retry hint) or ends at its own deadline (DEADLINE_EXCEEDED).
MAX_PENDING_CALLS = 1 << 16
MAX_PENDING_SECONDS = 24 * 3600
# Trailing metadata of a RESOURCE_EXHAUSTED answer: milliseconds to wait before retrying.
RETRY_AFTER_KEY = "retry-after-ms"
# Invocation metadata of a call: the request's id as its client knows it (for the logs).
REQUEST_ID_KEY = "x-request-id"
DEFAULT_GRACE_SECONDS = 10.0
# How often a drain checks whether the in-flight calls have ended.
_DRAIN_POLL_S = 0.05
# The health service name that reports liveness; "" and the services' names report readiness.
LIVENESS_SERVICE = "liveness"


def message_size_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple]:
    """Server options: size limits, accepting the clients' keepalive pings, and an exclusive
    port."""
    return message_size_options(max_message_bytes) + [
        # gRPC sets SO_REUSEPORT by default: a second server on a busy port would bind and
        # share its connections with the first instead of failing.
        ("grpc.so_reuseport", 0),
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
        ("grpc.server_max_unrequested_time_in_server", MAX_PENDING_SECONDS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple]:
    """Client channel options: size limits, keepalives so a dead peer is noticed, and
    reconnect attempts at least every second, so a restarted peer is found at once (gRPC's
    default backoff grows to two minutes while the peer is down)."""
    return message_size_options(max_message_bytes) + [
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]


def advertised_address(host: str, advertise_host: str | None, port: int) -> str:
    """``host:port`` others dial: ``advertise_host``, else the bind host, else (bound to
    every interface) this machine's hostname."""
    if advertise_host is None and host in ("0.0.0.0", "::"):
        advertise_host = socket.gethostname()
    return f"{advertise_host or host}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for tests; servers should bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------- exceptions
def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code an unhandled exception becomes."""
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, LookupError):  # KeyError, IndexError
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


def _details(exc: BaseException) -> str:
    # KeyError's str() is the repr of its key; say what was not found.
    if isinstance(exc, KeyError) and exc.args:
        return f"not found: {exc.args[0]}"
    return str(exc) or type(exc).__name__


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        logger.exception("%s failed", method)
    else:
        logger.debug("%s: %s: %s", method, code.name, exc)
    await context.abort(code, _details(exc))


class _Undecodable:
    """Stands for a request whose bytes did not parse (the handler is not called)."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer: Callable | None) -> Callable | None:
    # gRPC answers UNKNOWN when a deserializer raises; the caller sent bad bytes, so the
    # wrapped handler answers INVALID_ARGUMENT instead.
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, bad UTF-8, ...
            return _Undecodable(exc)
    return parse


async def _refuse_undecodable(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request could not be parsed: {request.error}")


def _wrap(behavior: Callable, method: str, streaming_response: bool) -> Callable:
    if streaming_response and inspect.isasyncgenfunction(behavior):
        async def stream_wrapper(request: Any, context: grpc.aio.ServicerContext):
            if isinstance(request, _Undecodable):
                await _refuse_undecodable(context, request)
            try:
                async for item in behavior(request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status code
                await _abort(context, method, exc)
        return stream_wrapper

    async def unary_wrapper(request: Any, context: grpc.aio.ServicerContext):
        if isinstance(request, _Undecodable):
            await _refuse_undecodable(context, request)
        try:
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            await _abort(context, method, exc)
    return unary_wrapper


class ExceptionInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping a handler to status codes.

    ValueError -> INVALID_ARGUMENT (its message names the field), KeyError/LookupError ->
    NOT_FOUND, TimeoutError -> DEADLINE_EXCEEDED, anything else -> INTERNAL (logged with
    its traceback). A single request that does not parse -> INVALID_ARGUMENT.
    """

    async def intercept_service(self, continuation: Callable[..., Awaitable],
                                handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler, False),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler, True))
        for attr, factory, streaming in kinds:
            behavior = getattr(handler, attr)
            if behavior is not None:
                deserializer = handler.request_deserializer
                if not handler.request_streaming:
                    deserializer = _tolerant(deserializer)
                return factory(_wrap(behavior, method, streaming),
                               request_deserializer=deserializer,
                               response_serializer=handler.response_serializer)
        return handler


# ----------------------------------------------------------------------- server
class PortInUseError(OSError):
    """A server's address is already bound by another process."""


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> ``(host, port)``; ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}.")
    return host.strip("[]"), int(port)


def is_port_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now (False for any address of ``host``
    that is taken). Port 0 is always free."""
    if port == 0:
        return True
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return True  # not ours to judge: the bind itself reports a bad host
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            # As the servers do: a port left in TIME_WAIT by a stopped server is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
    return True


class ServiceServer:
    """A grpc.aio server with health, reflection and the exception interceptor.

    Args:
        service_names: full names of the services added (for health and reflection).
        max_message_bytes: send and receive limit.
        options: extra channel arguments.
        credentials: TLS (gridllm.common.tls.server_credentials); None: plaintext.
        interceptors: run before the exception interceptor (an API-key check).
    """

    def __init__(self, service_names: Iterable[str],
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: list[tuple] | None = None,
                 credentials: grpc.ServerCredentials | None = None,
                 interceptors: list[grpc.aio.ServerInterceptor] | None = None):
        self.service_names = list(service_names)
        self.credentials = credentials
        self.server = grpc.aio.server(interceptors=[*(interceptors or ()),
                                                    ExceptionInterceptor()],
                                      options=server_options(max_message_bytes)
                                      + list(options or []))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = 0
        self._stop_event: asyncio.Event | None = None
        # Set once stopping began: readiness stays NOT_SERVING, new calls are refused. An
        # Event, so a servicer can be handed ``draining.is_set`` without referring back to
        # this server (a reference cycle would outlive the event loop the server runs on).
        self.draining = threading.Event()

    async def start(self, address: str) -> int:
        """Bind (``host:0`` picks a free port), start, and report NOT_SERVING (readiness)
        and SERVING (liveness).

        Returns:
            The bound port.
        Raises:
            PortInUseError: the address is taken (another server, or any other process).
        """
        try:
            self.port = (self.server.add_secure_port(address, self.credentials)
                         if self.credentials is not None
                         else self.server.add_insecure_port(address))
        except RuntimeError:  # grpcio raises this when bind() fails
            self.port = 0
        if self.port == 0:
            host, port = split_address(address)
            if not is_port_free(host, port):
                raise PortInUseError(f"port {port} is in use: cannot bind {address} "
                                     "(another process listens there; pick another port)")
            raise RuntimeError(f"could not bind {address}")
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.set_live(True)
        await self.server.start()
        return self.port

    @property
    def is_draining(self) -> bool:
        return self.draining.is_set()

    async def set_serving(self, is_serving: bool = True) -> None:
        """Readiness: whether the service takes new work now (never SERVING once draining)."""
        await self._set_status(health_pb2.HealthCheckResponse.SERVING
                               if is_serving and not self.is_draining
                               else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def set_live(self, is_live: bool = True) -> None:
        """Liveness: False when the process cannot make progress (restart it)."""
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING
                              if is_live else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_status(self, status: int) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def begin_drain(self) -> None:
        """Report NOT_SERVING for good; handlers refuse new work (``is_draining``)."""
        self.draining.set()
        await self.set_serving(False)

    async def stop(self, grace: float | None = DEFAULT_GRACE_SECONDS,
                   in_flight: Callable[[], int] | None = None) -> None:
        """Stop accepting calls (new ones get UNAVAILABLE), let in-flight ones finish within
        ``grace`` seconds, then cancel them.

        Args:
            in_flight: the service's calls in progress. Given, the server keeps taking calls
                until it reads 0 (or the grace ends), so a new call reaches its handler,
                which refuses it while draining with a message that says why, instead of
                the transport refusing it (or cancelling a connection mid-handshake once
                the last stream ended); only then does the transport stop.
        """
        await self.begin_drain()
        if in_flight is not None and grace is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while in_flight() > 0 and loop.time() < deadline:
                await asyncio.sleep(_DRAIN_POLL_S)
            grace = max(0.0, deadline - loop.time())
        await self.server.stop(grace)

    def request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    async def serve_until_signal(self, grace: float = DEFAULT_GRACE_SECONDS,
                                 on_stop: Callable[[], Awaitable[None]] | None = None,
                                 before_stop: Callable[[], Awaitable[None]] | None = None,
                                 in_flight: Callable[[], int] | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or request_stop()), then drain and stop.

        Args:
            grace: seconds in-flight calls get to finish.
            on_stop: awaited after the server stopped (close links, release resources).
            before_stop: awaited first (deregister, so nobody routes here any more).
            in_flight: as for ``stop``.
        """
        self._stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stop_event.set)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        await self._stop_event.wait()
        await self.begin_drain()
        if before_stop is not None:
            await before_stop()
        logger.info("stopping: draining in-flight calls for up to %.1fs", grace)
        await self.stop(grace, in_flight)
        if on_stop is not None:
            await on_stop()
        logger.info("stopped")


async def wait_for_serving(target: str, timeout: float = 30.0, service: str = "") -> None:
    """Poll a server's health until SERVING (TimeoutError after ``timeout`` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service),
                                         timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"{target} not SERVING after {timeout}s")
            await asyncio.sleep(0.05)


# ----------------------------------------------------------------------- background loops
async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``, waking early when ``stop`` is set.

    Returns:
        Whether ``stop`` is set.
    """
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter}, timeout=seconds)
    finally:
        waiter.cancel()
    return stop.is_set()


async def stop_tasks(tasks: Iterable[asyncio.Task], stop: asyncio.Event,
                     timeout: float = 2.0) -> None:
    """Stop background loops: set ``stop``, give them ``timeout`` seconds, then cancel.

    Loops must watch ``stop``: redis-py can swallow a cancel that lands inside a command,
    so a cancel alone may never end a loop that talks to Redis.
    """
    stop.set()
    tasks = [t for t in tasks if not t.done()]
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        _, stuck = await asyncio.wait(pending, timeout=timeout)
        for task in stuck:
            logger.warning("background task %s did not stop", task.get_name())
