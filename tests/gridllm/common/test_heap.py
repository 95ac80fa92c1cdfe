"""gridllm.common.heap: the heap frozen around in-process generation, and handed back."""

import gc
import threading
import weakref

import pytest

from gridllm.common import heap
from gridllm.common.heap import freeze_startup_objects, frozen_heap


@pytest.fixture(autouse=True)
def unfrozen(monkeypatch):
    monkeypatch.setattr(heap, "_frozen_for_life", False)
    threshold = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_objects_alive_on_entry_are_frozen_inside_and_handed_back_on_exit():
    alive = [[i] for i in range(1000)]
    with frozen_heap():
        assert gc.get_freeze_count() >= len(alive)
    assert gc.get_freeze_count() == 0
    assert alive


def test_nested_uses_share_one_freeze_released_by_the_outermost():
    # (Frozen objects still die when their last reference goes, so the count may drop a
    # little while frozen; releasing the freeze drops it to 0.)
    with frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with frozen_heap():
            assert gc.get_freeze_count() > frozen // 2
        assert gc.get_freeze_count() > frozen // 2
    assert gc.get_freeze_count() == 0


def test_an_exception_inside_still_hands_the_heap_back():
    with pytest.raises(RuntimeError, match="boom"), frozen_heap():
        raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0


def test_a_process_that_froze_its_heap_for_good_keeps_its_freeze():
    # A frozen object sits in no generation gc walks, so gc.get_objects() leaves it out.
    # (Not the freeze count: frozen objects that other threads of this process drop leave
    # the count while the test runs.)
    marker = [object()]
    freeze_startup_objects()
    assert all(o is not marker for o in gc.get_objects())
    with frozen_heap():
        pass
    assert gc.get_freeze_count() > 0
    assert all(o is not marker for o in gc.get_objects())


def test_objects_frozen_by_someone_else_do_not_stop_the_freeze():
    gc.freeze()  # a library's own freeze (not a service's for good)
    frozen_before = gc.get_freeze_count()
    alive = [[i] for i in range(1000)]  # built after it
    with frozen_heap():
        assert gc.get_freeze_count() >= frozen_before + len(alive) // 2
    assert gc.get_freeze_count() == 0


def test_concurrent_uses_release_when_the_last_leaves():
    entered, release = threading.Barrier(2), threading.Event()

    def hold():
        with frozen_heap():
            entered.wait(timeout=10)
            release.wait(timeout=10)

    thread = threading.Thread(target=hold)
    thread.start()
    with frozen_heap():
        entered.wait(timeout=10)
    assert gc.get_freeze_count() > 0  # the other thread is still inside
    release.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert gc.get_freeze_count() == 0


def test_a_cycle_that_dies_after_the_freeze_is_collected():
    class Node:
        pass

    node = Node()
    node.self = node
    ref = weakref.ref(node)
    with frozen_heap():
        del node
        gc.collect()
        assert ref() is not None  # frozen: full collections leave it
    gc.collect()
    assert ref() is None
