"""``freeze_heap``: what a process holds before it streams is out of the collector's
sight, and garbage made before that is still freed (tasks/ingest/live.py)."""

from __future__ import annotations

import gc
import weakref

from tasks.ingest.live import freeze_heap


class Node:
    me: Node


def test_garbage_is_collected_and_the_rest_frozen() -> None:
    lost = Node()
    lost.me = lost  # a cycle: only the collector frees it
    gone = weakref.ref(lost)
    del lost
    kept = Node()
    kept.me = kept
    try:
        freeze_heap()
        assert gone() is None, "a cycle made before freezing was frozen for good"
        assert gc.get_freeze_count() > 0
        # a full collection no longer walks what was alive at the freeze
        assert not any(o is kept for o in gc.get_objects())
        made_after = Node()
        assert any(o is made_after for o in gc.get_objects())
    finally:
        gc.unfreeze()
