"""An HTTP (ASGI) server run by uvicorn inside the service's own event loop.

The router serves its OpenAI-compatible API this way next to its gRPC server, and every
service its Prometheus metrics. uvicorn's ``serve()`` would take over SIGINT/SIGTERM, which
belong to the gRPC server's drain; this runs uvicorn's start-up, main loop and shutdown
steps directly instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
from typing import Any

from gridllm.common.grpc_utils import PortInUseError

logger = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Raises:
        PortInUseError: another process listens there.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given explicitly: asyncio sets TCP_NODELAY on accepted connections only when it
    # is IPPROTO_TCP; without it each streamed event waits for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # As the gRPC servers: a port in TIME_WAIT is free, one with a listener is not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(f"port {port} is in use: cannot bind {host}:{port} (another "
                                 "process listens there; pick another port)") from None
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpServer:
    """One ASGI app on one port.

    Args:
        app: the ASGI application.
        host, port: where to listen (port 0: a free one; ``port`` holds the bound one).
        name: shown in logs.
        keep_alive_s: seconds an idle keep-alive connection stays open.
        ssl: uvicorn's ``ssl_*`` settings to serve HTTPS (gridllm.common.tls); None: HTTP.
    """

    def __init__(self, app: Any, host: str, port: int, name: str = "http",
                 keep_alive_s: float = 30.0, ssl: dict[str, Any] | None = None):
        self.ssl = dict(ssl or {})
        self.app = app
        self.host = host
        self.port = port
        self.name = name
        self.keep_alive_s = keep_alive_s
        self._server: Any = None
        self._socket: socket.socket | None = None
        self._main_loop: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and accept connections; returns the bound port."""
        import uvicorn

        self._socket = bind_socket(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_keep_alive=self.keep_alive_s,
                                http=_http_implementation(), loop="none", **self.ssl)
        self._server = uvicorn.Server(config)
        config.load()
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[self._socket])
        self._main_loop = asyncio.create_task(self._server.main_loop(),
                                              name=f"{self.name}-server")
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, give open responses ``grace_s`` seconds, then cancel them."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.should_exit = True
        server.config.timeout_graceful_shutdown = grace_s
        if self._main_loop is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main_loop
        await server.shutdown(sockets=[self._socket] if self._socket else None)


@functools.cache
def _http_implementation() -> str:
    # httptools parses requests in C; h11 (pure Python) is the fallback uvicorn always has.
    try:
        import httptools  # noqa: F401
    except ImportError:
        logger.warning("httptools is not installed: uvicorn parses HTTP with h11 (pure Python), "
                       "which adds latency to every request; `pip install httptools`")
        return "h11"
    return "httptools"
