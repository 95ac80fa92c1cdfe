"""Forward-progress watchdog: notices a step that runs for too long.

A worker whose forward pass hangs (a wedged device, a deadlock in a kernel) keeps its event
loop and its heartbeat alive, so nothing else would notice it: its requests would wait for
ever. The watchdog looks at how long the current step has run; past the timeout it reports a
stall (the worker then turns NOT_SERVING and leaves the registry, so its scheduler moves the
requests to another worker), and when the step finishes at last it reports the recovery.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable

from gridllm.common.grpc_utils import stop_tasks, wait_or_stop

logger = logging.getLogger(__name__)


class ProgressWatchdog:
    """Calls ``on_change(True)`` once a step has run ``timeout_s`` seconds, ``on_change(False)``
    once steps finish again.

    Args:
        seconds_in_step: how long the step now running has taken (0 between steps).
        timeout_s: the longest a step may take.
        on_change: awaited with whether the worker is stalled, on every change.
    """

    def __init__(self, seconds_in_step: Callable[[], float], timeout_s: float,
                 on_change: Callable[[bool], Awaitable[None]]):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}.")
        self.seconds_in_step = seconds_in_step
        self.timeout_s = timeout_s
        # Weakly, when a method: its owner holds this watchdog, and a cycle through the
        # owner's gRPC server would keep that server alive past its event loop.
        self._on_change = (weakref.WeakMethod(on_change) if inspect.ismethod(on_change)
                           else lambda: on_change)
        self.is_stalled = False
        # Checked often enough that a stall is reported within a quarter of the timeout.
        self.interval_s = min(1.0, timeout_s / 4)
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="progress-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task], self._stop)

    async def _run(self) -> None:
        while not await wait_or_stop(self._stop, self.interval_s):
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the watchdog must outlive what it reports to
                logger.exception("progress watchdog check failed")

    async def check(self) -> None:
        """Compare the running step's age with the timeout; report a change."""
        seconds = self.seconds_in_step()
        is_stalled = seconds > self.timeout_s
        if is_stalled == self.is_stalled:
            return
        self.is_stalled = is_stalled
        if is_stalled:
            logger.error("no step finished for %.1fs (progress timeout %.1fs): reporting "
                         "NOT_SERVING and leaving the registry", seconds, self.timeout_s)
        else:
            logger.warning("steps finish again: serving and registering again")
        on_change = self._on_change()
        if on_change is not None:
            await on_change(is_stalled)
