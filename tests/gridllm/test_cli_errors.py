"""The CLI's edges: a wrong model, a bad --log-level, no server, --target forms, Ctrl-C.

Each runs the real ``gridllm`` entry point (in a subprocess where the exit status, stderr or a
signal is what is checked) and asserts one readable line, never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from gridllm.cli import main, parse_target
from gridllm.common.config import DEFAULT_ROUTER_PORT as DEFAULT_PORT
from gridllm.common.grpc_utils import free_port
from gridllm.v1 import generate_pb2, generate_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gridllm(*args: str, tmp_path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "GRIDLLM_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("GRIDLLM_LOGGING_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "gridllm.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=str(tmp_path))


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# ----------------------------------------------------------------------- gridllm up --model
def test_up_with_a_mistyped_model_fails_at_once_with_one_line(tmp_path):
    start = time.monotonic()
    result = _gridllm("up", "--model", "smolm2-135m", "--port", "0", tmp_path=tmp_path)
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    line = lines[0]
    for part in ("--model 'smolm2-135m'", "a preset (smollm2-135m", "random:tiny",
                 "HF directory", ".gguf", "did you mean 'smollm2-135m'?"):
        assert part in line, (part, line)
    # Nothing was started and nothing was left behind.
    assert not (tmp_path / "cache").exists()
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(("model", "problem"), [
    ("random:tine", "did you mean 'random:tiny'?"),
    ("{dir}", "is a directory without config.json"),
    ("{file}", "is a file but not a GGUF file"),
])
def test_up_names_what_is_wrong_with_the_model(model, problem, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    model = model.format(dir=tmp_path, file=tmp_path / "weights.bin")
    result = _gridllm("up", "--model", model, tmp_path=tmp_path)
    assert result.returncode == 2 and problem in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_up_refuses_a_tensor_parallel_size_the_model_cannot_be_split_by(tmp_path):
    # random:tiny has 4 attention heads.
    result = _gridllm("up", "--model", "random:tiny", "--port", "0", "--device", "cpu",
                      "--tensor-parallel-size", "3", tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "tensor_parallel_size must divide the model's 4 attention heads, got 3." in lines[0]
    # Refused before anything started: no log directory, no Redis.
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------- --log-level
def test_bad_log_level_is_a_one_line_error(tmp_path):
    result = _gridllm("--log-level", "LOUD", "generate", "hi", tmp_path=tmp_path)
    assert result.returncode == 2
    assert _error_lines(result.stderr) == [
        "gridllm: error: --log-level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL "
        "(any case), got 'LOUD'"]


def test_bad_logging_level_variable_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRIDLLM_LOGGING_LEVEL", "chatty")
    assert main(["generate", "hi"]) == 2
    assert "GRIDLLM_LOGGING_LEVEL must be one of" in capsys.readouterr().err


# ----------------------------------------------------------------------- --target
@pytest.mark.parametrize(("given", "dialed"), [
    ("localhost", f"localhost:{DEFAULT_PORT}"),
    ("127.0.0.1:9000", "127.0.0.1:9000"),
    ("http://localhost:8000", "localhost:8000"),
    ("http://example.com/", f"example.com:{DEFAULT_PORT}"),
    ("[::1]", f"[::1]:{DEFAULT_PORT}"),
    ("::1", f"[::1]:{DEFAULT_PORT}"),
    ("[::1]:9000", "[::1]:9000"),
    ("dns:///example.com:443", "dns:///example.com:443"),
])
def test_target_forms(given, dialed):
    assert parse_target(given) == dialed


@pytest.mark.parametrize(("given", "match"), [
    ("https://example.com:443", "plaintext gRPC, not TLS"),
    ("http://localhost:8000/v1", "has no path"),
    ("localhost:http", "port in 1..65535"),
    ("localhost:0", "port in 1..65535"),
    ("", "expected HOST"),
])
def test_bad_targets_are_refused_naming_the_flag(given, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_target(given)
    assert str(info.value).startswith("--target ")


def test_generate_without_a_server_says_so_and_suggests_up(tmp_path):
    port = free_port()
    result = _gridllm("generate", "--target", f"http://127.0.0.1:{port}", "hi",
                      tmp_path=tmp_path)
    assert result.returncode == 1
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert f"no gridllm server answers at 127.0.0.1:{port}" in lines[0]
    assert "gridllm up" in lines[0]


# ----------------------------------------------------------------------- Ctrl-C
class _EndlessGeneration(generate_pb2_grpc.GenerationServicer):
    """A server that streams one chunk, then nothing until the client goes away."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    async def Generate(self, request, context):
        yield generate_pb2.GenerateResponse(request_id="r", text="first words")
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.fixture
def endless_server():
    servicer = _EndlessGeneration()
    ready = threading.Event()
    state: dict = {}

    def serve() -> None:
        async def run() -> None:
            server = grpc.aio.server()
            generate_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
            state["port"] = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            state["stop"] = asyncio.Event()
            state["loop"] = asyncio.get_running_loop()
            ready.set()
            await state["stop"].wait()
            await server.stop(0)

        asyncio.run(run())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield state["port"], servicer
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


def test_ctrl_c_in_generate_exits_130_without_traceback(endless_server, tmp_path):
    port, servicer = endless_server
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gridllm.cli", "generate", "--target", f"127.0.0.1:{port}",
         "hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))
    try:
        first = proc.stdout.read(len("first words"))
        assert first == b"first words"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr, stderr.decode()
    # The request was cancelled on the server, not left running.
    assert servicer.cancelled.wait(10)
