"""A server refuses a port in use: another gRPC server's (gRPC would share it through
SO_REUSEPORT) or any other process's; and `gridllm up` exits at once naming the port."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest

from gridllm.common.grpc_utils import PortInUseError, ServiceServer, is_port_free

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


@pytest.fixture
def listening_socket():
    """A real socket listening on a loopback port (as any other server would)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_second_grpc_server_on_the_same_port_is_refused():
    async def main():
        first = ServiceServer(["test.A"])
        port = await first.start("127.0.0.1:0")
        try:
            second = ServiceServer(["test.B"])
            with pytest.raises(PortInUseError, match=f"port {port} is in use"):
                await second.start(f"127.0.0.1:{port}")
        finally:
            await first.stop(0)
        # Once the first is gone the port is free again for a new server.
        third = ServiceServer(["test.C"])
        assert await third.start(f"127.0.0.1:{port}") == port
        await third.stop(0)

    asyncio.run(main())


def test_port_held_by_another_process_is_refused(listening_socket):
    port = listening_socket.getsockname()[1]
    assert not is_port_free("127.0.0.1", port)

    async def main():
        with pytest.raises(PortInUseError, match=f"port {port} is in use"):
            await ServiceServer(["test.A"]).start(f"127.0.0.1:{port}")

    asyncio.run(main())


def test_is_port_free_sees_a_closed_port_as_free():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert is_port_free("127.0.0.1", port)
    assert is_port_free("127.0.0.1", 0)


def test_up_exits_at_once_naming_a_port_in_use(listening_socket, tmp_path):
    port = listening_socket.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT, "GRIDLLM_CACHE_DIR": str(tmp_path / "cache")}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gridllm.cli", "up", "--model", "random:tiny",
         "--port", str(port)], capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    assert f"port {port} is in use" in result.stderr
    assert "Traceback" not in result.stderr
    # Refused before anything started: no service was launched, no log directory made.
    assert "started" not in result.stderr
    assert not (tmp_path / "cache" / "logs").exists()
    assert elapsed < 30, f"took {elapsed:.1f}s"
