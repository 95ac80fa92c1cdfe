"""One request's grammar matcher (xgrammar), and the token bitmasks filled from a batch of
them.

xgrammar's calls release the GIL, so a batch advanced or filled in one call runs its C++
loop while the step loop's thread keeps running Python; called once per row instead, each
call has to win the GIL back, which another busy thread can delay by a switch interval.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

# Rows filled at once before the fill is spread over xgrammar's threads.
_MIN_ROWS_FOR_THREADS = 8
# Threads one batch of accepts is split over: xgrammar's accept releases the GIL, so on a
# host with cores to spare the rows' accepts run in parallel (2 cores: one thread, since
# the step loop and the grammar thread already take both).
_MAX_ACCEPT_THREADS = 4
ACCEPT_THREADS = max(1, min(_MAX_ACCEPT_THREADS, (os.cpu_count() or 1) // 4))
# Fewest rows per thread worth a hand-off to the pool.
_MIN_ROWS_PER_ACCEPT_THREAD = 8
_accept_pool: ThreadPoolExecutor | None = None
_accept_pool_lock = threading.Lock()
# Bit k of an int32 word (bit 31 reads as a negative number).
_BITS = (np.uint32(1) << np.arange(32, dtype=np.uint32)).view(np.int32)


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a token bitmask."""
    return -(-vocab_size // 32)


class RequestGrammar:
    """One request's grammar matcher, fed every token the request samples.

    Args:
        compiled: the grammar's compile (``GrammarCompiler.compile``).
        stop_token_ids: the tokens that may end the completion once the grammar is matched
            (EOS and the request's stop_token_ids).
        token_ids: tokens generated before (a rebuilt request), replayed into the matcher.
    """

    def __init__(self, compiled: Future, stop_token_ids: list[int],
                 token_ids: list[int] | None = None) -> None:
        self._compiled = compiled
        self.stop_token_ids = list(dict.fromkeys(stop_token_ids))
        # Accepted before the matcher existed (replayed when it is built).
        self._backlog = list(token_ids or [])
        self._stop_token_set = frozenset(self.stop_token_ids)
        self._matcher: Any = None
        # The matcher's is_terminated(), kept here: only an accepted stop token changes it,
        # and the per-step loops ask for it on every row.
        self._is_terminated = False
        self.num_accepted = 0
        # Set once the grammar rejected a token (or a replayed one): the request is refused.
        self.failure: str | None = None

    @property
    def is_ready(self) -> bool:
        """True once the compile has finished (successfully or not)."""
        return self._compiled.done()

    def error(self) -> str | None:
        """Why the grammar is unusable for this request (waits for the compile and builds
        the matcher); None while it is fine."""
        if self._matcher is not None:
            return self.failure
        exc = self._compiled.exception()
        if exc is not None:
            return str(exc)
        if self._matcher is None:
            self._build()
        return self.failure

    def _build(self) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(self._compiled.result(),
                                           override_stop_tokens=self.stop_token_ids or None)
        backlog, self._backlog = self._backlog, []
        for position, token_id in enumerate(backlog):
            if self.accept(token_id) is not None:
                self.failure = f"replaying generated token {position}: {self.failure}"
                return

    @property
    def matcher(self) -> Any:
        return self._matcher

    @property
    def is_terminated(self) -> bool:
        return self._is_terminated

    @property
    def _is_accepting(self) -> bool:
        # Past a stop token (ignore_eos) only stop tokens are allowed, and they are ignored.
        return self._matcher is not None and self.failure is None and not self._is_terminated

    def accept(self, token_id: int) -> str | None:
        """Advance by one sampled token; the reason, once, if the grammar does not allow it
        (the request is then refused; later tokens are ignored)."""
        if self._matcher is None:
            self._backlog.append(token_id)
            return None
        if not self._is_accepting:
            return None
        return self._record(token_id, self._matcher.accept_token(token_id))

    def _record(self, token_id: int, is_accepted: bool) -> str | None:
        if not is_accepted:
            self.failure = (f"the grammar does not allow token {token_id} after "
                            f"{self.num_accepted} tokens (is min_tokens past its end?)")
            return self.failure
        self.num_accepted += 1
        if token_id in self._stop_token_set:
            self._is_terminated = self._matcher.is_terminated()
        return None

    @staticmethod
    def accept_many(grammars: Sequence[RequestGrammar], token_ids: Sequence[int],
                    num_threads: int | None = None) -> list[str | None]:
        """``accept`` of each grammar's token, in one xgrammar call for them all (or one per
        thread, each over a contiguous share of the rows).

        Args:
            num_threads: threads to split the rows over; None: ``ACCEPT_THREADS``.
        Returns:
            Per grammar, the reason its token was refused (None where it was accepted).
        """
        errors: list[str | None] = [None] * len(grammars)
        if len(token_ids) != len(grammars):
            raise ValueError(f"token_ids must have one id per grammar ({len(grammars)}), "
                             f"got {len(token_ids)}.")
        positions = [i for i, g in enumerate(grammars) if g._is_accepting]
        for i, grammar in enumerate(grammars):
            if grammar._matcher is None:
                grammar._backlog.append(token_ids[i])
        if not positions:
            return errors
        live_ids = [token_ids[i] for i in positions]
        results = _batch_accept([grammars[i]._matcher for i in positions], live_ids,
                                ACCEPT_THREADS if num_threads is None else num_threads)
        for position, token_id, is_accepted in zip(positions, live_ids, results, strict=True):
            grammar = grammars[position]
            if is_accepted and token_id not in grammar._stop_token_set:
                grammar.num_accepted += 1  # the common case, inline
            else:
                errors[position] = grammar._record(token_id, is_accepted)
        return errors


def _batch_accept(matchers: list[Any], token_ids: list[int], num_threads: int) -> list[bool]:
    """xgrammar's batch accept, split over up to ``num_threads`` threads."""
    import xgrammar as xgr

    num_threads = min(num_threads, len(matchers) // _MIN_ROWS_PER_ACCEPT_THREAD)
    if num_threads <= 1:
        return xgr.BatchGrammarMatcher.batch_accept_token(matchers, token_ids)
    bounds = [len(matchers) * i // num_threads for i in range(num_threads + 1)]
    pool = _pool()
    futures = [pool.submit(xgr.BatchGrammarMatcher.batch_accept_token, matchers[a:b],
                           token_ids[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return [is_accepted for future in futures for is_accepted in future.result()]


def _pool() -> ThreadPoolExecutor:
    global _accept_pool
    with _accept_pool_lock:
        if _accept_pool is None:
            _accept_pool = ThreadPoolExecutor(max_workers=_MAX_ACCEPT_THREADS,
                                              thread_name_prefix="grammar-accept")
        return _accept_pool


class BitmaskFiller:
    """Fills the token bitmasks of constrained rows on the host.

    Args:
        vocab_size: columns of the logits.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.width = bitmask_width(vocab_size)
        self._host = np.zeros((0, self.width), dtype=np.int32)
        self._batch_matcher: Any = None

    def fill(self, grammars: list[RequestGrammar]) -> np.ndarray:
        """``[len(grammars), width]`` int32 bitmasks (a view reused by the next call)."""
        num_rows = len(grammars)
        if self._host.shape[0] < num_rows:
            self._host = np.zeros((max(num_rows, 2 * self._host.shape[0]), self.width),
                                  dtype=np.int32)
        host = self._host[:num_rows]
        self.fill_into(grammars, host)
        return host

    def fill_into(self, grammars: Sequence[RequestGrammar], out: np.ndarray,
                  out_rows: Sequence[int] | None = None) -> None:
        """Write the bitmask of ``grammars[i]`` into ``out[out_rows[i]]`` (default: row i).

        Args:
            grammars: matchers built and not failed.
            out: ``[rows, width]`` int32, C-contiguous (pinned host memory is fine).
            out_rows: distinct rows of ``out``.
        """
        rows = list(range(len(grammars))) if out_rows is None else list(out_rows)
        if len(rows) != len(grammars):
            raise ValueError(f"out_rows must have one row per grammar ({len(grammars)}), "
                             f"got {len(rows)}.")
        live = [g._matcher for g in grammars if not g._is_terminated]
        live_rows = rows
        if len(live) < len(grammars):
            live_rows = []
            for row, grammar in zip(rows, grammars, strict=True):
                if grammar._is_terminated:
                    # Matched and stopped (a stop token was ignored): only stop tokens follow.
                    out[row] = 0
                    for token_id in grammar.stop_token_ids:
                        out[row, token_id // 32] |= _BITS[token_id % 32]
                else:
                    live_rows.append(row)
        if len(live) >= _MIN_ROWS_FOR_THREADS:
            self._batch().batch_fill_next_token_bitmask(live, out, live_rows)
        else:
            for row, matcher in zip(live_rows, live, strict=True):
                matcher.fill_next_token_bitmask(out, row)

    def _batch(self) -> Any:
        if self._batch_matcher is None:
            import xgrammar as xgr

            self._batch_matcher = xgr.BatchGrammarMatcher()
        return self._batch_matcher
