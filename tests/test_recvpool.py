"""Big receive buffers are reused once their values are gone, and never while anything is built on them
(pod_kernel/recvpool.py)."""

from __future__ import annotations

import os
import weakref

import numpy as np

from pod_kernel import protocol as P
from pod_kernel import recvpool
from pod_kernel import write_tracking as W

SIZE = recvpool.POOL_MIN_BYTES


def receive(pool: recvpool.RecvPool, monkeypatch, fill: int):
    """A bundle received the way the pod kernel and the client receive one: a value built on its buffer, and a
    weak reference to that buffer (a strong one would keep it in use)."""
    monkeypatch.setattr(recvpool, "_pool", pool)
    monkeypatch.setattr(recvpool, "_pool_pid", os.getpid())
    array = np.full(SIZE, fill, dtype=np.uint8)
    sent = P.dump_values({"a": array})
    asm = P.BundleAssembler("pickle", sent.sizes)
    asm.prefault()
    for part in sent.parts:
        asm.feed(part)
    return P.load_values(asm.bundle())["a"], weakref.ref(asm.parts[1])


def test_a_buffer_is_reused_only_when_its_value_is_gone(monkeypatch):
    pool = recvpool.RecvPool(cap_bytes=4 * SIZE)
    first, buf = receive(pool, monkeypatch, 1)
    view = first[SIZE // 2:]  # a view keeps the memory in use too
    del first
    second, other = receive(pool, monkeypatch, 2)
    assert other() is not buf() and pool.reused == 0 and int(view[0]) == 1  # in use: a new map
    del view
    third, again = receive(pool, monkeypatch, 3)
    assert again() is buf() and pool.reused == 1  # free now: reused, and the new bytes are the value's
    assert int(third[0]) == 3 and int(third[-1]) == 3 and int(second[0]) == 2


def test_free_buffers_are_unmapped_past_their_time_or_the_cap(monkeypatch):
    pool = recvpool.RecvPool(cap_bytes=SIZE)  # room for one
    values = [receive(pool, monkeypatch, i) for i in range(3)]
    assert pool.trim() == 0  # all in use
    del values
    assert pool.trim(now=1000.0) == 2 and pool.idle_bytes() == SIZE  # over the cap: the older two go
    assert pool.trim(now=1000.0 + recvpool.IDLE_TTL_S + 1) == 1  # past its time: the last one goes
    assert pool.idle_bytes() == 0 and pool._lent == []


def test_a_reused_buffer_is_unprotected_first_and_its_old_digest_forgotten(monkeypatch):
    pool = recvpool.RecvPool(cap_bytes=4 * SIZE)
    size = max(SIZE, W.TRACK_MIN_BYTES)
    monkeypatch.setattr(recvpool, "_pool", pool)
    monkeypatch.setattr(recvpool, "_pool_pid", os.getpid())
    buf = P._buffer(size)
    P._prefault(buf)
    tracker = W.tracker()
    protected = tracker.seed(memoryview(buf), b"old digest", buf)
    other = P._buffer(size)  # held too
    assert other is not buf  # in use (this test holds it): a new map
    seeded = weakref.ref(buf)
    del buf
    again = P._buffer(size)
    assert again is seeded() and pool.reused == 1
    if protected:
        with memoryview(again) as view:
            start, end = W._pages(W.buffer_address(view), view.nbytes)
            assert not any(e.start < end and start < e.end for e in tracker._entries.values())
        fresh = np.frombuffer(again, dtype=np.uint8)
        fresh[:8] = 7  # the new bytes: their digest is taken, not the old one vouched for
        assert P.fingerprint(fresh) == P.fingerprint(fresh.copy())
        del fresh
    del again, other


def test_the_pool_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("KT_RECV_POOL_BYTES", "0")
    pool = recvpool.RecvPool()
    first, buf = receive(pool, monkeypatch, 1)
    del first
    _second, other = receive(pool, monkeypatch, 2)
    assert other() is not buf() and pool.reused == 0


def test_a_receive_looks_at_the_newest_maps_of_its_size_only():
    """Thousands of same-sized values held: a receive checks at most TAKE_SCAN_MAX maps (newest first)."""
    import mmap

    pool = recvpool.RecvPool(cap_bytes=1 << 40)
    held = [mmap.mmap(-1, SIZE) for _ in range(recvpool.TAKE_SCAN_MAX + 6)]
    for buf in held:
        pool.lend(buf)
    del buf
    oldest = held.pop(0)  # free now, but behind TAKE_SCAN_MAX newer maps in use
    del oldest
    assert pool.take(SIZE) is None
    newest = held.pop()  # free, the newest
    del newest
    assert pool.take(SIZE) is not None and pool.reused == 1
