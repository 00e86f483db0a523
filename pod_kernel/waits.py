"""Waits of the main thread that a signal always ends.

CPython runs a signal's Python handler (Ctrl-C's KeyboardInterrupt, the kubelet's SIGTERM) only in the main
thread, between two bytecodes. A signal that reaches the main thread just before it blocks (its C handler runs,
then the thread enters the system call that waits), or that the kernel gives to another thread, leaves the
handler due until the main thread runs Python again: a wait without end would never see it. So these waits
block at most :data:`MAIN_WAIT_SLICE_S` at a time, and a late handler runs within that.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

__all__ = ["MAIN_WAIT_SLICE_S", "acquire", "future_result", "slices", "wait_event"]

T = TypeVar("T")

#: Longest a wait blocks in one system call: how late a signal's handler can run, at most.
MAIN_WAIT_SLICE_S = 0.2


def slices(timeout: float | None) -> Iterator[float]:
    """Timeouts of successive waits that together last ``timeout`` seconds (None: without end), none over
    :data:`MAIN_WAIT_SLICE_S`; the last is what is left (0 once the time is up)."""
    if timeout is None:
        while True:
            yield MAIN_WAIT_SLICE_S
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= MAIN_WAIT_SLICE_S:
            yield max(0.0, left)
            return
        yield MAIN_WAIT_SLICE_S


def wait_event(event: threading.Event, timeout: float | None = None) -> bool:
    """``event.wait(timeout)``, in slices."""
    return any(event.wait(s) for s in slices(timeout))


def acquire(lock: Any, timeout: float | None = None) -> bool:
    """``lock.acquire(timeout=timeout)`` (a Lock or an RLock), in slices."""
    return any(lock.acquire(timeout=s) for s in slices(timeout))


def future_result(fut: concurrent.futures.Future[T], timeout: float | None = None) -> T:
    """``fut.result(timeout)``, in slices (``TimeoutError`` once ``timeout`` is up)."""
    for s in slices(timeout):
        try:
            return fut.result(s)
        except TimeoutError:
            if fut.done():  # the call itself raised TimeoutError
                raise
    raise TimeoutError
