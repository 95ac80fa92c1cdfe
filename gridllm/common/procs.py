"""What Linux's ``/proc`` says about a process: whether it still runs, its stat fields."""

from __future__ import annotations

import os

# Whether processes can be looked up in /proc (Linux).
HAS_PROC = os.path.isdir("/proc/self")
# The states of a process that has exited (a zombie waits only for its parent to reap it).
EXITED_STATES = ("Z", "X")


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, proc(5)'s third on (the
    state letter at 0, the process group at 2, user and system clock ticks at 11 and 12);
    None when they cannot be read (no such process, or no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces and parentheses: split after its last ")".
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (one that only waits for its
    parent to reap it); False where ``/proc`` cannot tell."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] not in EXITED_STATES
