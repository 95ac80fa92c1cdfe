"""Checks the e2e tests make of a running stack: waiting for a condition, every KV block free,
and a canary request run again and again beside other traffic."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from gridllm.client import Client


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str,
               interval_s: float = 0.1) -> Any:
    """``predicate()``'s first true value, asked every ``interval_s``; AssertionError naming
    ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def all_blocks_free(client: Client) -> bool:
    """No request running or waiting, and every worker's KV blocks free."""
    stats = client.server_stats()
    return (stats.num_requests_running == stats.num_requests_waiting == 0
            and bool(stats.workers)
            and all(w.kv_blocks_free == w.kv_blocks_total for w in stats.workers))


class Canary:
    """Runs ``run_once(client)`` again and again in a thread until stopped; counts the runs
    whose result differs from ``expected``, and the errors of the types ``errors`` (then
    closes ``client``).

    Args:
        client: what a run goes through (gridllm's ``Client``, an ``openai.OpenAI``...).
        run_once: one canary request through ``client``, returning what it produced.
        expected: what an undisturbed run produced.
        errors: the exception types a run may end with that count as failures.
    """

    def __init__(self, client: Any, run_once: Callable[[Any], Any], expected: Any,
                 errors: type[BaseException] | tuple[type[BaseException], ...]):
        self.expected = expected
        self.num_runs = 0
        self.failures: list[str] = []
        self._client = client
        self._run_once = run_once
        self._errors = errors
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Canary:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120.0)
        self._client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                got = self._run_once(self._client)
            except self._errors as err:
                self.failures.append(f"{type(err).__name__}: {err}")
                continue
            self.num_runs += 1
            if got != self.expected:
                self.failures.append(f"run {self.num_runs} differs: {got!r}")
