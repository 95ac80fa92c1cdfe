"""Keeps a set of child processes running: a dead one is restarted with backoff, and a crash
loop (``max_crashes`` exits of one service within ``crash_window_s``) is given up on loudly.

The supervisor knows nothing of what the processes are: each service is a name, a way to get
its current process and a way to start a new one. ``check()`` is one non-blocking pass (a
restart starts the process and returns; the service becomes healthy on its own), so a
service that takes minutes to load does not stall the care of the others.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gridllm.common.cli_args import option
from gridllm.common.config import require

logger = logging.getLogger(__name__)


class Process(Protocol):
    """What the supervisor needs of a child process (``launcher.ManagedProcess`` has it)."""

    name: str
    log_path: str

    def exit_code(self) -> int | None: ...

    @property
    def is_stopped(self) -> bool: ...


@dataclass
class RestartPolicy:
    """When and how often a dead service is started again."""

    max_crashes: int = option(5, help="a service that exits this many times within "
                                      "--crash-window is in a crash loop: the stack stops, "
                                      "exit status 1, naming the service and its log")
    crash_window_s: float = option(60.0, flag="--crash-window", metavar="S",
                                   help="seconds over which --max-crashes are counted")
    # Delay before the k-th restart within the window: base * 2**(k-1), at most max.
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        require(self.max_crashes >= 1, "max_crashes", "must be at least 1", self.max_crashes)
        require(self.crash_window_s > 0, "crash_window_s", "must be positive",
                self.crash_window_s)
        require(self.backoff_base_s >= 0, "backoff_base_s", "must be non-negative",
                self.backoff_base_s)
        require(self.backoff_max_s >= self.backoff_base_s, "backoff_max_s",
                "must be at least backoff_base_s", self.backoff_max_s)

    def backoff_s(self, num_crashes: int) -> float:
        """Seconds to wait before restarting after the ``num_crashes``-th recent crash."""
        return min(self.backoff_base_s * 2 ** max(num_crashes - 1, 0), self.backoff_max_s)


class CrashLoopError(RuntimeError):
    """A service keeps dying: restarting it again would not help."""

    def __init__(self, name: str, num_crashes: int, window_s: float, log_path: str,
                 exit_code: int | None):
        super().__init__(f"{name} crashed {num_crashes} times within {window_s:.0f}s "
                         f"(last exit code {exit_code}); giving up on the stack. "
                         f"See its log: {log_path}")
        self.name = name
        self.log_path = log_path


@dataclass
class _Service:
    name: str
    current: Callable[[], Process]
    restart: Callable[[], Process]
    # time.monotonic() of each recent crash, oldest first.
    crash_times: collections.deque
    # When the pending restart is due (None: none pending).
    restart_at: float | None = None
    num_restarts: int = 0


class Supervisor:
    """Restarts dead services with backoff; raises CrashLoopError on a crash loop.

    Args:
        policy: RestartPolicy.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, policy: RestartPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.services: dict[str, _Service] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Set while the stack stops: nothing is restarted any more.
        self.is_paused = False
        # What made a background supervisor give up (a CrashLoopError), if anything.
        self.error: BaseException | None = None

    def watch(self, name: str, current: Callable[[], Process],
              restart: Callable[[], Process]) -> None:
        """Supervise the service ``name``: ``current()`` is its process now, ``restart()``
        starts a new one (without waiting for it to be healthy) and returns it."""
        with self._lock:
            self.services[name] = _Service(name, current, restart, collections.deque())

    def num_restarts(self, name: str) -> int:
        return self.services[name].num_restarts

    def is_settled(self) -> bool:
        """No restart is pending and every supervised process runs."""
        with self._lock:
            return all(s.restart_at is None and s.current().exit_code() is None
                       for s in self.services.values())

    def check(self) -> None:
        """One pass: note the services that died, start those whose backoff has passed.

        Raises:
            CrashLoopError: a service exited ``max_crashes`` times within the window.
        """
        with self._lock:
            if self.is_paused:
                return
            for service in self.services.values():
                self._check_one(service)

    def pause(self) -> None:
        """Restart nothing from now on (waits for a pass in progress)."""
        with self._lock:
            self.is_paused = True

    def _check_one(self, service: _Service) -> None:
        now = self.clock()
        if service.restart_at is not None:
            if now >= service.restart_at:
                self._restart(service, now)
            return
        process = service.current()
        exit_code = process.exit_code()
        if exit_code is None or process.is_stopped:
            return  # running, or stopped on purpose
        self._note_crash(service, now, exit_code, process.log_path)

    def _note_crash(self, service: _Service, now: float, exit_code: int | None,
                    log_path: str) -> None:
        crashes = service.crash_times
        crashes.append(now)
        while crashes and now - crashes[0] > self.policy.crash_window_s:
            crashes.popleft()
        if len(crashes) >= self.policy.max_crashes:
            logger.error("%s crashed %d times within %.0fs; giving up (log %s)", service.name,
                         len(crashes), self.policy.crash_window_s, log_path)
            raise CrashLoopError(service.name, len(crashes), self.policy.crash_window_s,
                                 log_path, exit_code)
        delay = self.policy.backoff_s(len(crashes))
        logger.warning("%s exited with code %s; restarting it in %.1fs (crash %d of %d "
                       "allowed within %.0fs; log %s)", service.name, exit_code, delay,
                       len(crashes), self.policy.max_crashes - 1, self.policy.crash_window_s,
                       log_path)
        service.restart_at = now + delay

    def _restart(self, service: _Service, now: float) -> None:
        service.restart_at = None
        try:
            service.restart()
        except Exception as exc:  # noqa: BLE001 - a failed start counts as a crash
            logger.error("restarting %s failed: %s", service.name, exc)
            self._note_crash(service, now, None, service.current().log_path)
            return
        service.num_restarts += 1
        logger.info("restarted %s (restart %d)", service.name, service.num_restarts)

    # ----------------------------------------------------------------- background
    def start(self, interval_s: float = 0.5,
              on_give_up: Callable[[BaseException], None] | None = None) -> None:
        """Run ``check()`` every ``interval_s`` in a daemon thread until ``stop()``; a crash
        loop is kept in ``error`` and passed to ``on_give_up`` (called in the thread).

        The processes it restarts are its children: stop them before ``stop()`` ends the
        thread (the launcher ties each child's life to the thread that started it).
        """
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(interval_s, on_give_up),
                                        name="supervisor", daemon=True)
        self._thread.start()

    def _run(self, interval_s: float,
             on_give_up: Callable[[BaseException], None] | None) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.check()
            except CrashLoopError as exc:
                self.error = exc
                self.pause()
                if on_give_up is not None:
                    on_give_up(exc)
            except Exception:  # noqa: BLE001 - keep supervising the others
                logger.exception("supervisor pass failed")

    def stop(self) -> None:
        """Stop the background thread (waits for a pass in progress)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30.0)
        self._thread = None
