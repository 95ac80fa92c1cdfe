"""`gridllm up` keeps its logs in one place ($GRIDLLM_CACHE_DIR/logs, or --log-dir), keeps
only the newest runs there, and leaves nothing in the temp directory."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from gridllm.launcher import LocalStack, StackConfig, log_root, new_log_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_log_root_follows_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GRIDLLM_CACHE_DIR", str(tmp_path))
    assert log_root() == str(tmp_path / "logs")


def test_only_the_newest_runs_are_kept(tmp_path):
    made = []
    for i in range(7):
        made.append(new_log_dir(str(tmp_path), max_kept=3))
        # Distinct modification times, as runs started apart have.
        os.utime(made[-1], (1_000_000 + i, 1_000_000 + i))
    kept = sorted(os.path.join(tmp_path, d) for d in os.listdir(tmp_path))
    assert kept == sorted(made[-3:])
    assert all(os.path.basename(p).startswith("up-") for p in made)


def test_rotation_leaves_other_folders_alone(tmp_path):
    (tmp_path / "mine").mkdir()
    for _ in range(4):
        newest = new_log_dir(str(tmp_path), max_kept=1)
    assert sorted(os.listdir(tmp_path)) == sorted(["mine", os.path.basename(newest)])


def test_given_log_dir_is_used_as_is(tmp_path):
    stack = LocalStack(StackConfig(model="random:tiny", log_dir=str(tmp_path / "here")))
    assert stack.log_dir == str(tmp_path / "here")


@pytest.mark.slow
def test_up_logs_under_the_cache_and_nothing_in_tmp(tmp_path, redis_server):
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": ROOT, "GRIDLLM_CACHE_DIR": str(cache),
           "TMPDIR": str(tmp), "GRIDLLM_LOGGING_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "gridllm.cli", "up", "--model", "random:tiny", "--port", "0",
         "--http-port", "0",
         "--redis-url", redis_server.rsplit("/", 1)[0] + "/11", "--num-kv-blocks", "16",
         "--device", "cpu", "--startup-timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path),
        start_new_session=True)
    try:
        line = launcher.stdout.readline().decode()
        match = re.search(r"logs in (\S+)\)", line)
        assert match, (line, launcher.stderr.read1().decode() if launcher.poll() else "")
        log_dir = match.group(1)
        assert os.path.dirname(log_dir) == str(cache / "logs")
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert {"scheduler.log", "worker-1.log", "router.log"} <= set(os.listdir(log_dir))
    # Nothing named after gridllm was left in the temp directory.
    deadline = time.monotonic() + 5
    while [d for d in os.listdir(tmp) if d.startswith("gridllm")] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [d for d in os.listdir(tmp) if d.startswith("gridllm")]
