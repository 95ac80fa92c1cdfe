"""The garbage collector and a long-running engine: keep long-lived objects out of full
collections.

Python's full (oldest-generation) collection walks every tracked object. After start-up an
engine process holds hundreds of thousands of them (imported modules, the tokenizer, the
weights' Python objects), and a full collection comes every few hundred steps of a large
batch: on an H200 host with Llama-3-8B and 256 running requests each took 245-277 ms, three
per 1,024-token run, with the GPU idle meanwhile. Frozen objects (``gc.freeze``) sit those
collections out: the same run's full collections then took 7-21 ms.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

# Allocations between young-generation collections (Python's default: 700). A service
# allocates a few short-lived containers per request per step (futures, updates, deltas),
# nearly all freed by reference counting; at the default the collector ran every few
# hundred tokens and took a quarter of the router's Python time per token.
GC_GEN0_THRESHOLD = 20_000

_lock = threading.Lock()
_depth = 0
_owns_freeze = False
# Set once a service has frozen its start-up heap for good. Not read from
# ``gc.get_freeze_count()``: a library may freeze a few objects of its own (on the GPU
# image, 375 are frozen before start-up ends), and that must not stop ``frozen_heap``.
_frozen_for_life = False


def freeze_startup_objects() -> None:
    """For a service process, once start-up is done: freeze what start-up built, for the
    process's life, and run young collections every ``GC_GEN0_THRESHOLD`` allocations."""
    global _frozen_for_life
    gc.collect()
    gc.freeze()
    _frozen_for_life = True
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Inside, the objects that existed on entry sit out full collections; on exit they
    are handed back (``gc.unfreeze``), so whatever of them dies later is still collected.

    For in-process generation, whose objects must not outlive the caller's use (a frozen
    cycle is never freed). Nested and concurrent uses share one freeze, released by the
    last to leave; a process that froze its heap for good (``freeze_startup_objects``)
    keeps its freeze. Objects something else froze before entry are handed back on exit
    with the rest (``gc.unfreeze`` releases every frozen object): freezing only spares
    them the collector's walks."""
    global _depth, _owns_freeze
    with _lock:
        if _depth == 0:
            _owns_freeze = not _frozen_for_life
            if _owns_freeze:
                gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _owns_freeze:
                gc.unfreeze()
                _owns_freeze = False
