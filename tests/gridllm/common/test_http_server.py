"""gridllm.common.http_server: uvicorn in the caller's loop, ports and TCP_NODELAY."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from gridllm.common.grpc_utils import PortInUseError
from gridllm.common.http_server import HttpServer, bind_socket


async def _streaming_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await asyncio.sleep(0.005)
    for _ in range(5):
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await asyncio.sleep(0.002)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def test_small_writes_are_not_held_back_on_a_reused_connection():
    """Without TCP_NODELAY each small write after the first waits for the client's delayed
    ACK (40 ms on Linux) once a keep-alive connection is reused."""

    async def main() -> list[float]:
        server = HttpServer(_streaming_app, "127.0.0.1", 0)
        port = await server.start()
        gaps = []
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(6):
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                await writer.drain()
                await reader.readuntil(b"\r\n\r\n")
                start = time.perf_counter()
                await reader.readuntil(b"0\r\n\r\n")
                gaps.append(time.perf_counter() - start)
            writer.close()
        finally:
            await server.stop(1.0)
        return gaps

    gaps = asyncio.run(asyncio.wait_for(main(), 30))
    # 15 ms of sleeps per response; a write held for the delayed ACK adds ~40 ms to every
    # response on a reused connection (the fastest one shows it, whatever the machine's load).
    assert min(gaps[1:]) < 0.035, gaps


def test_a_busy_port_is_refused_by_name():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} is in use"):
            bind_socket("127.0.0.1", port)
