"""Big receive buffers are reused once their values are gone, and never while anything is built on them
(pod_kernel/recvpool.py)."""

from __future__ import annotations

import mmap
import os
import threading
import time
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
    with asm.faulting_in():
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
    recvpool.populate(buf)
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


def _wait_for_spare(pool: recvpool.RecvPool, count: int) -> None:
    deadline = time.monotonic() + 30
    while pool.spared < count or pool._making:
        assert time.monotonic() < deadline, "the spare was never faulted in"
        time.sleep(0.01)


def test_a_name_pushed_again_finds_a_spare_faulted_in_ahead(monkeypatch):
    """The second push of a name still holds the first value while it arrives: without a spare it would fault
    fresh pages in; with one it takes memory faulted in ahead, in the background, once the first arrived."""
    monkeypatch.setattr(recvpool, "SPARE_MIN_BYTES", SIZE)
    pool = recvpool.RecvPool(cap_bytes=4 * SIZE)
    first, buf = receive(pool, monkeypatch, 1)
    _wait_for_spare(pool, 1)
    assert pool.idle_bytes() == SIZE  # the spare, free, of that size
    second, other = receive(pool, monkeypatch, 2)  # the first value is still held
    assert other() is not buf() and pool.reused == 1 and pool.spared == 1  # it took the spare
    assert int(second[0]) == 2 and int(second[-1]) == 2 and int(first[0]) == 1
    assert not pool._making and pool.idle_bytes() == 0  # a reused map makes no spare: none is made again
    del first
    third, again = receive(pool, monkeypatch, 3)
    assert again() is buf() and pool.reused == 2 and pool.spared == 1 and int(third[5]) == 3


def test_no_spare_without_room_for_it(monkeypatch):
    monkeypatch.setattr(recvpool, "SPARE_MIN_BYTES", SIZE)
    small = recvpool.RecvPool(cap_bytes=4 * SIZE)
    monkeypatch.setattr(recvpool, "SPARE_MIN_BYTES", 2 * SIZE)
    _value, _buf = receive(small, monkeypatch, 1)  # below the size that gets spares
    assert small.ready_spare(SIZE) is False and small.spared == 0
    monkeypatch.setattr(recvpool, "SPARE_MIN_BYTES", SIZE)
    capped = recvpool.RecvPool(cap_bytes=SIZE // 2)  # the cap cannot hold it
    assert capped.ready_spare(SIZE) is False
    tight = recvpool.RecvPool(cap_bytes=4 * SIZE)
    monkeypatch.setattr(recvpool, "_memory_left", lambda: 2 * SIZE - 1)  # under twice its size left
    assert tight.ready_spare(SIZE) is False and not tight._making
    monkeypatch.setattr(recvpool, "_memory_left", lambda: 2 * SIZE)
    assert tight.ready_spare(SIZE) is True
    assert tight.ready_spare(SIZE) is False  # one of that size is being made or is free already
    _wait_for_spare(tight, 1)
    assert tight.ready_spare(SIZE) is False and tight.idle_bytes() == SIZE
    monkeypatch.setenv("KT_RECV_POOL_BYTES", "0")
    assert recvpool.RecvPool().ready_spare(SIZE) is False  # the pool turned off: no spares either


def steps_while_populating(size: int, step) -> list[tuple[float, int]]:
    """Fault a new map of ``size`` in (in a thread) while this thread calls ``step()`` in a loop; three tries, for
    a busy machine, until a step ended in the middle half of the call. Each try's (ms the call took, steps that
    ended in its middle half); the last try's count is 0 when none did."""
    results = []
    for _ in range(3):
        buf = recvpool.new_map(size)
        span: list[float] = []

        def fault(buf=buf, span=span) -> None:
            span.append(time.perf_counter())
            recvpool.populate(buf)
            span.append(time.perf_counter())

        thread = threading.Thread(target=fault)
        steps = []
        thread.start()
        while thread.is_alive():
            step()
            steps.append(time.perf_counter())
        thread.join()
        assert buf[size - 1] == 0 and buf[0] == 0
        buf.close()
        start, end = span
        quarter = (end - start) / 4
        inside = sum(start + quarter < t < end - quarter for t in steps)
        results.append((round((end - start) * 1e3, 1), inside))
        if inside:
            break
    return results


def test_populate_lets_other_threads_run():
    """Faulting a big map in must not stop the process's other threads (its network loop, the cell): Python's
    mmap.madvise holds the GIL for the whole call (0.2-0.6 s per GiB here); populate releases it. Held, the main
    thread could take no step in the middle half of the call."""
    results = steps_while_populating(256 << 20, lambda: None)
    assert results[-1][1], f"the main thread stalled while a map was faulted in: (ms, steps in its middle half) {results}"


def test_populate_goes_in_chunks_so_other_threads_can_change_mappings_meanwhile():
    """One madvise over a whole map holds the process's memory-map lock for the whole call: an ``mprotect`` (write
    tracking) or ``mmap`` in another thread waited for all of it (a received 1 GiB's spare held the pod's
    check after the cell 1.75 s). In chunks, one waits for a chunk at most: mappings change in the middle half
    of the call."""
    other = recvpool.new_map(1 << 20)

    def change_a_mapping() -> None:
        _mprotect(other, mmap.PROT_READ)
        _mprotect(other, mmap.PROT_READ | mmap.PROT_WRITE)

    results = steps_while_populating(8 * recvpool.POPULATE_CHUNK_BYTES, change_a_mapping)
    other.close()
    assert results[-1][1], f"no mapping changed while a map was faulted in: (ms, changes in its middle half) {results}"


def test_populate_without_madvise_populate_touches_the_pages_chunk_by_chunk(monkeypatch):
    """A kernel before 5.14 refuses MADV_POPULATE_WRITE: the pages are touched instead, and a receive waiting for
    them still hears of each chunk as it is done (not only at the end)."""
    tries = []

    class OldKernel:
        def madvise(self, *args):
            tries.append(args)
            return -1

    monkeypatch.setattr(recvpool, "_libc", OldKernel())
    chunk = recvpool.POPULATE_CHUNK_BYTES
    buf = recvpool.new_map(2 * chunk + 4096)
    ends: list[int] = []
    recvpool.populate(buf, on_chunk=ends.append)
    assert ends == [chunk, 2 * chunk, 2 * chunk + 4096] and len(tries) == 1  # asked once, then touched
    assert buf[0] == 0 and buf[len(buf) - 1] == 0
    buf.close()


def _mprotect(buf, prot: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    held = ctypes.c_char.from_buffer(buf)
    try:
        assert libc.mprotect(ctypes.addressof(held), len(buf), prot) == 0
    finally:
        del held


def _fresh_assembler(monkeypatch, sizes):
    monkeypatch.setattr(recvpool, "_pool", recvpool.RecvPool(cap_bytes=0))
    monkeypatch.setattr(recvpool, "_pool_pid", os.getpid())
    return P.BundleAssembler("pickle", sizes)


def test_a_receive_waits_for_its_new_memory_faulted_in_ahead_by_a_thread_that_is_joined(monkeypatch):
    """A bulk receive into new maps: a thread faults them in ahead of the bytes (all of it before the first byte
    left the sender waiting: a first 1 GiB push took 2.1-3.0 s here, 0.39 s ahead); the receive waits where the
    thread has not been yet; a part that is not new never waits; the thread ends with the receive."""
    chunk = 1 << 20
    steps = threading.Semaphore(0)
    faulted: list[int] = []

    def populate(buf, stop=None, on_chunk=None):  # a slow kernel: one chunk per step the test allows
        for end in range(chunk, len(buf) + 1, chunk):
            while not steps.acquire(timeout=0.01):
                if stop is not None and stop.is_set():
                    return
            faulted.append(end)
            on_chunk(end)

    monkeypatch.setattr(recvpool, "populate", populate)
    asm = _fresh_assembler(monkeypatch, [100, 8 * chunk])
    with asm.faulting_in() as ready:
        ready(0, 100)  # a small part (a bytearray): at once
        waiter = threading.Thread(target=ready, args=(1, 2 * chunk))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive() and faulted == []  # nothing faulted in yet: it waits
        steps.release()
        waiter.join(0.2)
        assert waiter.is_alive() and faulted == [chunk]  # one chunk is not enough
        steps.release()
        waiter.join(10)
        assert not waiter.is_alive() and faulted == [chunk, 2 * chunk]
        threads = {t.name for t in threading.enumerate()}
        assert "kt-fault-ahead" in threads
    assert "kt-fault-ahead" not in {t.name for t in threading.enumerate()}  # stopped mid-map, and joined
    asm.parts[1].close()  # nothing holds an export of it any more


def test_a_receive_into_new_maps_gets_its_bytes_and_a_failed_fault_thread_never_holds_it_up(monkeypatch):
    import socket

    from pod_kernel import bulk

    sizes = [3 * recvpool.POPULATE_CHUNK_BYTES + 12345, 100]
    payload = [np.random.default_rng(1).integers(0, 255, sizes[0], dtype=np.uint8).tobytes(), b"x" * 100]
    for failing in (False, True):
        if failing:
            def populate(buf, stop=None, on_chunk=None):
                raise OSError("no memory")
            monkeypatch.setattr(recvpool, "populate", populate)
        asm = _fresh_assembler(monkeypatch, sizes)
        a, b = socket.socketpair()
        sender = threading.Thread(target=bulk.send_parts, args=(a, [memoryview(p) for p in payload]))
        sender.start()
        with asm.faulting_in() as ready:
            bulk.recv_parts(b, asm.parts, ready=ready)
        sender.join()
        a.close()
        b.close()
        assert bytes(asm.parts[0]) == payload[0] and bytes(asm.parts[1]) == payload[1]
        asm.parts[0].close()


def test_the_memory_limit_and_what_is_left_come_from_the_cgroup_v2_or_v1(monkeypatch, tmp_path):
    monkeypatch.setattr(recvpool, "CGROUP_ROOT", tmp_path)
    (tmp_path / "memory.max").write_text("max\n")  # v2 without a limit: the machine's
    assert recvpool._cgroup_memory() is None and recvpool._memory_limit() > 0
    (tmp_path / "memory.max").write_text(f"{8 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{5 << 30}\n")
    assert recvpool._memory_limit() == 8 << 30 and recvpool._memory_left() <= 3 << 30
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()  # v1
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    assert recvpool._cgroup_memory() is None
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{4 << 30}\n")
    assert recvpool._cgroup_memory() == (4 << 30, 1 << 30) and recvpool.idle_cap_bytes() == (4 << 30) // 8
    assert recvpool._memory_left() <= 3 << 30
