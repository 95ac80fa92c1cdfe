"""``gridllm up``'s supervision flags, and what its loop does when the supervisor gives up."""

from __future__ import annotations

import logging
import signal

import pytest

from gridllm import cli
from gridllm.cli import build_parser, stack_config_from_args
from gridllm.supervisor import CrashLoopError


def test_restart_flags_reach_the_stack_config():
    config = stack_config_from_args(build_parser().parse_args(["up"]))
    assert config.restart is True
    assert (config.restart_policy.max_crashes, config.restart_policy.crash_window_s) == (5, 60.0)
    config = stack_config_from_args(build_parser().parse_args(
        ["up", "--no-restart", "--max-crashes", "2", "--crash-window", "7.5"]))
    assert config.restart is False
    assert (config.restart_policy.max_crashes, config.restart_policy.crash_window_s) == (2, 7.5)
    with pytest.raises(ValueError, match="max_crashes"):
        stack_config_from_args(build_parser().parse_args(["up", "--max-crashes", "0"]))


class _GivingUpSupervisor:
    def __init__(self):
        self.num_checks = 0

    def check(self):
        self.num_checks += 1
        if self.num_checks == 2:
            raise CrashLoopError("worker-1", 5, 60.0, "/logs/worker-1.log", -9)


class _FakeStack:
    """What cmd_up uses of LocalStack; records the calls."""

    instances: list[_FakeStack] = []

    def __init__(self, config):
        self.config, self.calls = config, []
        self.endpoint, self.log_dir, self.processes = "127.0.0.1:1", "/logs", []
        self.http_endpoint, self.tls = None, None
        self.supervisor = _GivingUpSupervisor()
        _FakeStack.instances.append(self)

    def start(self):
        self.calls.append("start")
        return self

    def stop(self):
        self.calls.append("stop")


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_crash_loop_stops_the_stack_and_exits_1_naming_the_service(
        monkeypatch, caplog, restore_signals):
    import gridllm.common.presets as presets

    monkeypatch.setattr(presets, "check_model", lambda model, flag=None: None)
    monkeypatch.setattr(cli, "LocalStack", _FakeStack)
    monkeypatch.setattr(cli, "_SUPERVISE_INTERVAL_S", 0.01)
    with caplog.at_level(logging.ERROR, logger="gridllm.cli"):
        code = cli.cmd_up(build_parser().parse_args(["up"]))
    (stack,) = _FakeStack.instances
    assert code == 1
    assert stack.calls == ["start", "stop"] and stack.supervisor.num_checks == 2
    (message,) = [r.getMessage() for r in caplog.records if r.name == "gridllm.cli"]
    assert "worker-1 crashed 5 times" in message and "/logs/worker-1.log" in message
