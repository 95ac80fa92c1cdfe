"""Structured outputs' host work per step, kept off the step loop where it can be.

A constrained row's next mask needs the token it just sampled. On the step loop that is
a serial chain each step: wait for the ids, feed them to the matchers, fill the masks,
send them. Here a step's ``advance`` hands
its sampled ids to one background thread instead, which waits for them to reach the host,
feeds every row's token in one xgrammar call, and at once fills those rows' next masks
into a pinned host buffer (both calls release the GIL). The step loop meanwhile reads the
previous outputs, schedules and queues the next forward; when the next step samples, its
masks are usually ready and go to the device in one non-blocking copy.

Each half of an advance (accepting, filling) is claimed by whichever thread gets to it
first: the loop, when it needs a result the thread has not started on (with one step in
flight the step's own output asks which tokens were refused at once), does that half
itself instead of waiting for the thread to be scheduled: the loop never waits for work
nobody has started.

Exactness: every prefilled mask is stamped with its grammar's ``num_accepted``; a row is
sent its prefilled mask only if the grammar has not moved since, and is filled on the loop
otherwise (a new request's first token, a batch whose rows changed). Matchers are touched
by one thread at a time: the loop waits for every advance in flight before it touches one.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import torch

from worker_svc.grammar_matcher import BitmaskFiller, RequestGrammar
from worker_svc.staging import HostToDevice

logger = logging.getLogger(__name__)

# The interpreter's GIL switch interval while the background thread works (seconds). The
# thread needs the GIL back after each xgrammar call; while the step loop runs pure Python
# (the scheduler) it would wait up to the default 5 ms for it, longer than the work.
_SWITCH_INTERVAL_S = 0.0005


@dataclass
class MaskTimings:
    """Host seconds of structured decoding, summed over steps (``on_loop``: the step
    loop's thread; ``off_loop``: the background thread)."""

    # The step loop blocked until the background thread had accepted a step's tokens
    # (the step's output needs to know which ones the grammars refused) ...
    wait_accept_on_loop: float = 0.0
    # ... or filled the masks the next step samples with.
    wait_fill_on_loop: float = 0.0
    # Masks filled on the loop: waiting for the sampled ids to reach the host first.
    wait_ids_on_loop: float = 0.0
    # Tokens fed to matchers.
    accept_on_loop: float = 0.0
    accept_off_loop: float = 0.0
    # Masks filled (and prefilled rows gathered) into the pinned buffer.
    fill_on_loop: float = 0.0
    fill_off_loop: float = 0.0
    # Masks and their rows queued for the device.
    send_on_loop: float = 0.0
    # Rows whose mask came prefilled / was filled on the loop.
    num_prefilled_rows: int = 0
    num_loop_filled_rows: int = 0

    @property
    def on_loop(self) -> float:
        """The loop's host time for structured outputs (the device's time to produce the
        ids, ``wait_ids_on_loop``, left out: an unconstrained step waits for them too)."""
        return (self.wait_accept_on_loop + self.wait_fill_on_loop + self.accept_on_loop
                + self.fill_on_loop + self.send_on_loop)

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "on_loop": self.on_loop}


class MaskBuffers:
    """Host buffers for bitmasks in rotation (pinned on CUDA), each rewritten only after
    its last copy to the device has run.

    Args:
        width: int32 words per row.
        device: where the masks go; on the CPU the buffer itself is handed out.
        num_buffers: buffers in rotation (one being filled, one being sent, one spare).
    """

    def __init__(self, width: int, device: torch.device, num_buffers: int = 3) -> None:
        self.width = width
        self.device = device
        self._tensors: list[torch.Tensor | None] = [None] * num_buffers
        self._arrays: list[np.ndarray | None] = [None] * num_buffers
        self._events: list[torch.cuda.Event | None] = [None] * num_buffers
        self._next = 0

    def acquire(self, num_rows: int) -> int:
        """The next buffer with at least ``num_rows`` rows, free to write (its index)."""
        index = self._next
        self._next = (index + 1) % len(self._tensors)
        event = self._events[index]
        if event is not None:
            event.synchronize()
        self._grow(index, num_rows)
        return index

    def reserve(self, num_rows: int) -> None:
        """Make every buffer hold ``num_rows`` rows (a buffer in use is replaced, not
        overwritten: its copy keeps the old one alive)."""
        for index in range(len(self._tensors)):
            self._grow(index, num_rows)

    def _grow(self, index: int, num_rows: int) -> None:
        tensor = self._tensors[index]
        if tensor is not None and tensor.shape[0] >= num_rows:
            return
        rows = max(num_rows, 8, 0 if tensor is None else 2 * tensor.shape[0])
        tensor = torch.empty((rows, self.width), dtype=torch.int32,
                             pin_memory=self.device.type == "cuda")
        self._tensors[index] = tensor
        self._arrays[index] = tensor.numpy()

    def array(self, index: int) -> np.ndarray:
        array = self._arrays[index]
        assert array is not None
        return array

    def send(self, index: int, num_rows: int) -> torch.Tensor:
        """The first ``num_rows`` rows on the device (a copy queued without waiting)."""
        tensor = self._tensors[index]
        assert tensor is not None
        host = tensor[:num_rows]
        if self.device.type == "cpu":
            return host
        dev = torch.empty(host.shape, dtype=torch.int32, device=self.device)
        dev.copy_(host, non_blocking=True)
        event = self._events[index]
        if event is None:
            event = self._events[index] = torch.cuda.Event()
        event.record()
        return dev


@dataclass
class _Prefill:
    """Masks filled right after a step's tokens were accepted."""

    buffer: int
    # grammar -> (row in the buffer, its num_accepted when filled)
    rows: dict[RequestGrammar, tuple[int, int]]


class StepAdvance:
    """One step's sampled ids on their way into the grammars of its masked rows.

    Args:
        grammars: the grammars of the rows this step masked.
        rows: their rows of ``token_ids``.
        token_ids: the step's sampled ids on the host (landed once ``event`` has).
        event: recorded after the copy of ``token_ids`` (None: already there).
    """

    def __init__(self, grammars: list[RequestGrammar], rows: list[int],
                 token_ids: torch.Tensor, event: torch.cuda.Event | None) -> None:
        self.grammars = grammars
        self.rows = rows
        self.token_ids = token_ids
        self.event = event
        # {row: why its grammar refused its token}
        self.accepted: Future = Future()
        # _Prefill | None (None when filled on the loop)
        self.prefilled: Future = Future()
        self._lock = threading.Lock()
        # part ("accept", "fill") -> who does it ("loop", "thread")
        self._owners: dict[str, str] = {}

    def claim(self, part: str, owner: str) -> bool:
        """True if ``part`` was nobody's and is now ``owner``'s to do."""
        with self._lock:
            if part in self._owners:
                return False
            self._owners[part] = owner
            return True


class MaskPipeline:
    """Accepts each step's tokens and fills the next step's masks, off the step loop when
    ``is_overlapped``.

    Args:
        filler: fills masks from matchers.
        device: where the sampler's logits live.
        is_overlapped: accept and prefill on a background thread; False does both on the
            step loop when they are needed (the reference the overlapped path must equal).
    """

    def __init__(self, filler: BitmaskFiller, device: torch.device,
                 is_overlapped: bool = True) -> None:
        self.filler = filler
        self.is_overlapped = is_overlapped
        self.buffers = MaskBuffers(filler.width, device)
        self._rows_staging = HostToDevice(device)
        self._executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-step",
                                             initializer=_use_device,
                                             initargs=(_device_index(device),))
                          if is_overlapped else None)
        # Advances whose prefill the loop has not collected yet, oldest first.
        self._in_flight: collections.deque[StepAdvance] = collections.deque()
        self._prefill: _Prefill | None = None
        self.timings = MaskTimings()

    def advance(self, grammars: list[RequestGrammar], rows: list[int],
                token_ids: torch.Tensor, event: torch.cuda.Event | None) -> StepAdvance:
        """Feed a step's sampled ids to its masked rows' grammars (in the background when
        overlapped; else when ``errors`` or the next ``masks`` asks)."""
        # One advance on the thread at a time (the step's masks() has waited already).
        self.wait()
        step = StepAdvance(grammars, rows, token_ids, event)
        self._in_flight.append(step)
        if self._executor is not None:
            # Pinned memory is allocated here, never on the background thread.
            self.buffers.reserve(len(grammars))
            if sys.getswitchinterval() > _SWITCH_INTERVAL_S:
                logger.info("GIL switch interval %.1f ms -> %.1f ms (structured outputs' "
                            "masks are filled on a background thread)",
                            1000 * sys.getswitchinterval(), 1000 * _SWITCH_INTERVAL_S)
                sys.setswitchinterval(_SWITCH_INTERVAL_S)
            self._executor.submit(self._run, step)
        return step

    def errors(self, step: StepAdvance) -> dict[int, str]:
        """The rows of ``step`` whose grammar refused its token (their reasons), once the
        step's tokens (and every earlier step's) are accepted."""
        if not step.accepted.done():
            for earlier in list(self._in_flight):
                self._wait_accepted(earlier)
                if earlier is step:
                    break
        return step.accepted.result()

    def masks(self, grammars: list[RequestGrammar], rows: list[int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The bitmasks of ``grammars`` (built, not failed) for logits ``rows``, on the
        device: ``(bitmask [R, W] int32, rows [R] int64)``."""
        self.wait()
        prefill, self._prefill = self._prefill, None
        start = time.perf_counter()
        hits = [] if prefill is None else [_lookup(prefill, g) for g in grammars]
        num_rows = len(grammars)
        if prefill is not None and hits == list(range(num_rows)):
            index = prefill.buffer  # the rows of the last step, in the same order
            self.timings.num_prefilled_rows += num_rows
        else:
            index = self.buffers.acquire(num_rows)
            out = self.buffers.array(index)
            found = [i for i, hit in enumerate(hits) if hit is not None]
            if found:
                source = self.buffers.array(prefill.buffer)  # type: ignore[union-attr]
                out[found] = source[[hits[i] for i in found]]
                self.timings.num_prefilled_rows += len(found)
            missing = [i for i in range(num_rows) if i >= len(hits) or hits[i] is None]
            self.filler.fill_into([grammars[i] for i in missing], out, missing)
            self.timings.num_loop_filled_rows += len(missing)
        filled = time.perf_counter()
        self.timings.fill_on_loop += filled - start
        bitmask = self.buffers.send(index, num_rows)
        dev_rows = self._rows_staging.send({"rows": np.asarray(rows, dtype=np.int64)})["rows"]
        self.timings.send_on_loop += time.perf_counter() - filled
        return bitmask, dev_rows

    def wait(self) -> None:
        """Wait for every advance in flight: the matchers are the caller's again (the
        newest advance's prefilled masks are kept for ``masks``)."""
        while self._in_flight:
            step = self._in_flight.popleft()
            self._wait_accepted(step)
            if step.claim("fill", "loop"):
                step.prefilled.set_result(None)  # masks() fills on the loop
            elif not step.prefilled.done():
                start = time.perf_counter()
                step.prefilled.result()
                self.timings.wait_fill_on_loop += time.perf_counter() - start
            self._prefill = step.prefilled.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- internals ---------------------------------------------------------------------
    def _wait_accepted(self, step: StepAdvance) -> None:
        if step.claim("accept", "loop"):
            self._accept(step, on_loop=True)
        elif not step.accepted.done():
            start = time.perf_counter()
            step.accepted.exception()
            self.timings.wait_accept_on_loop += time.perf_counter() - start
        step.accepted.result()

    def _accept(self, step: StepAdvance, on_loop: bool) -> None:
        try:
            if step.event is not None:
                wait_start = time.perf_counter()
                step.event.synchronize()  # the ids' copy to the host has run
                if on_loop:
                    self.timings.wait_ids_on_loop += time.perf_counter() - wait_start
            start = time.perf_counter()
            ids = step.token_ids.tolist()
            results = RequestGrammar.accept_many(step.grammars, [ids[r] for r in step.rows])
        except BaseException as exc:  # surfaces wherever the result is asked for
            step.accepted.set_exception(exc)
            raise
        step.accepted.set_result({row: error for row, error in zip(step.rows, results,
                                                                      strict=True)
                                  if error is not None})
        elapsed = time.perf_counter() - start
        if on_loop:
            self.timings.accept_on_loop += elapsed
        else:
            self.timings.accept_off_loop += elapsed

    def _run(self, step: StepAdvance) -> None:
        """The background thread's part of one step: the halves the loop has not claimed."""
        try:
            if step.claim("accept", "thread"):
                self._accept(step, on_loop=False)
            else:
                step.accepted.result()
        except BaseException as exc:
            if step.claim("fill", "thread"):
                step.prefilled.set_exception(exc)
            return
        if not step.claim("fill", "thread"):
            return
        try:
            start = time.perf_counter()
            live = [g for g in step.grammars if g.failure is None and g.matcher is not None]
            index = self.buffers.acquire(len(live))
            self.filler.fill_into(live, self.buffers.array(index))
            step.prefilled.set_result(_Prefill(index, {
                g: (row, g.num_accepted) for row, g in enumerate(live)}))
            self.timings.fill_off_loop += time.perf_counter() - start
        except BaseException as exc:
            logger.exception("prefilling masks failed")
            step.prefilled.set_exception(exc)


def _device_index(device: torch.device) -> int | None:
    """The CUDA device the step loop works on (``cuda`` alone: its current one)."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _use_device(index: int | None) -> None:
    """The background thread's CUDA device (its events and buffers belong to it)."""
    if index is not None:
        torch.cuda.set_device(index)


def _lookup(prefill: _Prefill, grammar: RequestGrammar) -> int | None:
    """The buffer row of ``grammar``'s prefilled mask if it still holds (no token since)."""
    hit = prefill.rows.get(grammar)
    if hit is None or hit[1] != grammar.num_accepted or grammar.failure is not None:
        return None
    return hit[0]
