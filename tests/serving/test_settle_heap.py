"""serving.pool.settle_heap: freeze what survives a collection, but never keep frozen garbage."""

from __future__ import annotations

import gc
import weakref

from service.serving.pool import settle_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_frozen_cycles_are_freed_by_the_next_settle() -> None:
    node = _Node()
    ref = weakref.ref(node)
    settle_heap()  # the cycle is alive: frozen with the rest of the heap
    assert gc.get_freeze_count() > 0
    del node
    gc.collect()
    assert ref() is not None  # frozen: a plain collection does not see it (why settle unfreezes first)
    settle_heap()  # as after an unload: unfreeze, collect, freeze what is left
    assert ref() is None
    gc.unfreeze()


def test_a_loads_settle_freezes_what_is_new_and_leaves_the_frozen_heap_alone() -> None:
    settle_heap()
    old = _Node()
    settle_heap(unfreeze=False)  # alive: frozen
    old_ref = weakref.ref(old)
    del old
    young = _Node()
    young_ref = weakref.ref(young)
    del young
    settle_heap(unfreeze=False)  # as after a load: the young cycle is garbage, the frozen one waits
    assert young_ref() is None and old_ref() is not None
    settle_heap()  # the next unload's settle frees it
    assert old_ref() is None
    gc.unfreeze()
