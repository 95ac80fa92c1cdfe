"""gridllm.common.procs against real child processes: running, a zombie, reaped."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gridllm.common.procs import HAS_PROC, is_running, stat_fields

pytestmark = pytest.mark.skipif(not HAS_PROC, reason="reads /proc (Linux)")


def test_a_child_runs_then_is_a_zombie_then_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             start_new_session=True)
    try:
        fields = stat_fields(child.pid)
        assert fields is not None and fields[0] in "RSD"
        assert int(fields[2]) == child.pid  # its own process group
        assert is_running(child.pid)
        child.kill()
        deadline = time.monotonic() + 10.0
        while is_running(child.pid):
            assert time.monotonic() < deadline, "a killed child still counts as running"
            time.sleep(0.02)
        assert stat_fields(child.pid)[0] == "Z"  # not reaped yet: a zombie
    finally:
        child.kill()
        child.wait()
    assert stat_fields(child.pid) is None and not is_running(child.pid)


def test_this_process_counts_cpu_ticks():
    fields = stat_fields(os.getpid())
    assert fields is not None and is_running(os.getpid())
    assert int(fields[11]) + int(fields[12]) > 0  # user + system ticks of a Python process
