"""gridllm.cli: `up` starts a real stack and stops all of it on SIGTERM; `generate` streams
from it; `run` generates in-process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from gridllm.cli import build_parser, main
from tests.e2e.tiny_model import build_tiny_served_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "Hello world"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    # Short context: the CLI commands size nothing beyond it.
    return build_tiny_served_model(tmp_path_factory.mktemp("cli-model"), max_model_len=256)


@pytest.fixture(scope="module")
def reference_text(model_dir) -> str:
    from gridllm.common.sampling_params import SamplingParams
    from gridllm.llm import LLM

    llm = LLM(model_dir, device="cpu", num_kv_blocks=32)
    return llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=12),
                        use_tqdm=False)[0].outputs[0].text


def test_parser_defaults():
    args = build_parser().parse_args(["up"])
    assert (args.model, args.num_workers, args.port, args.redis_url) == ("smollm2-135m", 1,
                                                                         50051, None)
    args = build_parser().parse_args(["generate", "hi"])
    assert args.target == "localhost:50051" and args.prompt == "hi"


def test_run_generates_in_process(model_dir, reference_text, capsys):
    assert main(["run", "--model", model_dir, "--device", "cpu", "--num-kv-blocks", "32",
                 "--max-tokens", "12", PROMPT]) == 0
    assert capsys.readouterr().out == reference_text + "\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; it only waits for its parent to reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT, "GRIDLLM_LOGGING_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_up_serves_generate_and_stops_everything_on_sigterm(model_dir, reference_text,
                                                            tmp_path):
    # Ctrl-C (SIGINT) goes through the same handler in cmd_up; one signal is tested.
    signum = signal.SIGTERM
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        # Its own session: SIGTERM goes to the launcher alone, not to a process group.
        launcher = subprocess.Popen(
            [sys.executable, "-m", "gridllm.cli", "up", "--model", model_dir, "--workers", "1",
             "--port", "0", "--num-kv-blocks", "32", "--log-dir", str(tmp_path / "logs"),
             "--startup-timeout", "120"],
            stdout=subprocess.PIPE, stderr=log, env=_env(), cwd=str(tmp_path),
            start_new_session=True)
    try:
        line = launcher.stdout.readline().decode()
        endpoint = re.search(r" at (\S+:\d+) ", line)
        assert endpoint, (line, log_path.read_text())
        result = subprocess.run(
            [sys.executable, "-m", "gridllm.cli", "generate", "--target", endpoint.group(1),
             "--max-tokens", "12", "--timeout", "60", PROMPT],
            capture_output=True, env=_env(), timeout=120)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert result.stdout.decode() == reference_text + "\n"
        pids = {name: int(pid) for name, pid in
                re.findall(r"started (\S+) \(pid (\d+)\)", log_path.read_text())}
        assert set(pids) == {"redis", "scheduler", "worker-1", "router"}
        assert all(_alive(pid) for pid in pids.values())

        launcher.send_signal(signum)
        assert launcher.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [name for name, pid in pids.items() if _alive(pid)], "orphans left"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
