"""A cache entry's object that dies in a garbage collection while its thread holds the cache's lock (the tests of
pod_kernel's caches share it: tests/test_protocol.py, tests/test_write_tracking.py)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Any


def dies_in_a_collection_under(lock: Any, make: Callable[[], Any], present: Callable[[int], bool]) -> list:
    """Make an object in a reference cycle (``make``: returns it after giving it a cache entry), let only the
    cycle hold it, then collect garbage while this thread holds ``lock``: the entry's callback runs right there.
    In a thread of its own, bounded: a callback that waits for that lock waits for ever."""
    out: list = []

    def scenario() -> None:
        class Cycle:
            pass

        c = Cycle()
        c.me = c
        c.value = make()
        key = id(c.value)
        assert present(key)
        del c
        with lock:
            gc.collect()
        out.append(present(key))

    t = threading.Thread(target=scenario, daemon=True)
    t.start()
    t.join(20)
    return out
