"""The supervisor: restarts with backoff, gives up on a crash loop, leaves stopped ones alone.

Real child processes (``ManagedProcess`` running ``sleep`` or an exiting shell) for the
restart paths; a fake clock and fake processes for the exact backoff and window arithmetic.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from gridllm.common.procs import HAS_PROC, is_running
from gridllm.launcher import ManagedProcess
from gridllm.supervisor import CrashLoopError, RestartPolicy, Supervisor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


class Slot:
    """One supervised service: its current process and how to start another."""

    def __init__(self, name: str, argv: list[str], log_path: str):
        self.name, self.argv, self.log_path = name, argv, log_path
        self.started: list[ManagedProcess] = []
        self.start()

    def start(self) -> ManagedProcess:
        self.started.append(ManagedProcess(self.name, self.argv, self.log_path).start())
        return self.started[-1]

    @property
    def process(self) -> ManagedProcess:
        return self.started[-1]

    def stop_all(self) -> None:
        for process in self.started:
            process.stop(grace_s=1.0)


@pytest.fixture
def slots(tmp_path):
    made: list[Slot] = []

    def make(name: str, argv: list[str]) -> Slot:
        made.append(Slot(name, argv, str(tmp_path / f"{name}.log")))
        return made[-1]

    yield make
    for slot in made:
        slot.stop_all()


def supervise(slots_list: list[Slot], policy: RestartPolicy) -> Supervisor:
    supervisor = Supervisor(policy)
    for slot in slots_list:
        supervisor.watch(slot.name, lambda s=slot: s.process, slot.start)
    return supervisor


def test_a_killed_process_is_restarted_and_a_stopped_one_is_not(slots):
    worker = slots("worker-1", ["sleep", "60"])
    other = slots("worker-2", ["sleep", "60"])
    supervisor = supervise([worker, other], RestartPolicy(backoff_base_s=0.1))
    supervisor.start(interval_s=0.02)
    try:
        first_pid = worker.process.pid
        worker.process.signal(signal.SIGKILL)
        wait_until(lambda: len(worker.started) == 2 and worker.process.is_alive(), 5.0,
                   "the killed process to be started again")
        assert worker.process.pid != first_pid
        assert supervisor.num_restarts("worker-1") == 1
        # Stopped on purpose: stays stopped.
        other.process.stop(grace_s=1.0)
        time.sleep(0.3)
        assert len(other.started) == 1 and supervisor.num_restarts("worker-2") == 0
        assert supervisor.error is None
    finally:
        supervisor.stop()


def test_a_crash_loop_gives_up_naming_the_service_and_its_log(slots, caplog):
    crashing = slots("scheduler", ["sh", "-c", "echo cannot bind; exit 3"])
    healthy = slots("router", ["sleep", "60"])
    given_up: list[BaseException] = []
    supervisor = supervise([crashing, healthy], RestartPolicy(
        max_crashes=3, crash_window_s=30.0, backoff_base_s=0.05))
    with caplog.at_level(logging.WARNING, logger="gridllm.supervisor"):
        supervisor.start(interval_s=0.02, on_give_up=given_up.append)
        wait_until(lambda: bool(given_up), 10.0, "the supervisor to give up")
    supervisor.stop()
    (error,) = given_up
    assert isinstance(error, CrashLoopError) and error is supervisor.error
    assert error.name == "scheduler" and error.log_path == crashing.log_path
    assert "scheduler crashed 3 times" in str(error) and crashing.log_path in str(error)
    assert "last exit code 3" in str(error)
    # Two restarts, then the third crash ends it; the healthy service was left alone.
    assert len(crashing.started) == 3 and len(healthy.started) == 1
    assert healthy.process.is_alive()
    warnings = [r.getMessage() for r in caplog.records if "restarting it in" in r.getMessage()]
    assert len(warnings) == 2 and all(crashing.log_path in w for w in warnings)


class FakeProcess:
    def __init__(self, name: str):
        self.name, self.log_path, self.code, self.is_stopped = name, f"{name}.log", None, False

    def exit_code(self):
        return self.code


def test_backoff_doubles_and_crashes_outside_the_window_are_forgotten():
    now = [0.0]
    policy = RestartPolicy(max_crashes=3, crash_window_s=10.0, backoff_base_s=1.0,
                           backoff_max_s=3.0)
    supervisor = Supervisor(policy, clock=lambda: now[0])
    current = [FakeProcess("w")]
    restarts: list[float] = []

    def restart():
        restarts.append(now[0])
        current[0] = FakeProcess("w")
        return current[0]

    supervisor.watch("w", lambda: current[0], restart)

    def crash_and_restart() -> float:
        crashed_at = now[0]
        current[0].code = -9
        supervisor.check()
        num_before = len(restarts)
        while len(restarts) == num_before:
            now[0] += 0.25
            supervisor.check()
        return restarts[-1] - crashed_at

    assert crash_and_restart() == 1.0  # first crash in the window: base
    assert crash_and_restart() == 2.0  # second: doubled
    now[0] += 20.0  # both fall out of the window
    assert crash_and_restart() == 1.0
    assert crash_and_restart() == 2.0
    current[0].code = 1
    with pytest.raises(CrashLoopError, match="w crashed 3 times within 10s"):
        supervisor.check()
    assert policy.backoff_s(5) == 3.0  # capped


def test_a_failed_restart_counts_as_a_crash():
    now = [0.0]
    supervisor = Supervisor(RestartPolicy(max_crashes=2, backoff_base_s=0.0),
                            clock=lambda: now[0])
    dead = FakeProcess("router")
    dead.code = 1

    def restart():
        raise OSError("port 50051 is in use")

    supervisor.watch("router", lambda: dead, restart)
    supervisor.check()  # crash 1: restart due now
    with pytest.raises(CrashLoopError, match="router crashed 2 times"):
        supervisor.check()  # the restart fails: crash 2


@pytest.mark.parametrize("field, value", [("max_crashes", 0), ("crash_window_s", 0.0),
                                          ("backoff_base_s", -1.0)])
def test_restart_policy_names_a_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        RestartPolicy(**{field: value})


@pytest.mark.skipif(not HAS_PROC, reason="reads /proc (Linux)")
def test_a_child_becomes_its_command_and_dies_with_the_launcher(tmp_path):
    code = ("import sys, time\n"
            "from gridllm.launcher import ManagedProcess\n"
            "child = ManagedProcess('child', ['sleep', '60'], sys.argv[1]).start()\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "child.log")],
                                stdout=subprocess.PIPE, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": ROOT})
    try:
        pid = int(launcher.stdout.readline())
        wait_until(lambda: open(f"/proc/{pid}/cmdline").read() == "sleep\x0060\x00", 10.0,
                   "the child to exec its command")
        launcher.kill()  # no chance to stop its children itself
        launcher.wait()
        wait_until(lambda: not is_running(pid), 10.0, "the child to die with the launcher")
    finally:
        launcher.kill()
        launcher.wait()
        if is_running(pid):
            os.kill(pid, signal.SIGKILL)
