"""Big buffers are not hashed again while no page of theirs was written (pod_kernel/write_tracking.py).

Every kind of write must still be seen: a write from Python, from C (numpy), from
the kernel (recv_into), through an overlapping view; and a value's fingerprint
is the same with or without tracking.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pod_kernel import protocol as P
from pod_kernel import recvpool
from pod_kernel import write_tracking as W

BIG = W.TRACK_HEAP_MIN_BYTES  # tracked wherever malloc puts it (smaller ones only outside the heap)
#: what crosses the bulk channel with its digest (bulk.py): sent buffers this big are vouched for at once
SENT = max(W.TRACK_MIN_BYTES, P.HASH_PARALLEL_MIN_BYTES)

needs_tracking = pytest.mark.skipif(not W.tracker().available, reason="no userfaultfd write protection here")


@needs_tracking
def test_unchanged_big_buffer_is_vouched_for_and_every_write_is_seen():
    t = W.tracker()
    a = np.zeros(BIG // 8)
    first = P.fingerprint(a)
    before = t.vouched
    assert P.fingerprint(a) == first and t.vouched == before  # hashed again, and protected from now on
    assert P.fingerprint(a) == first and t.vouched == before + 1  # not read again
    a[len(a) // 2] = 1.0  # one 8-byte write in the middle
    second = P.fingerprint(a)
    assert second != first
    a[-1] += 1  # after a write the buffer is hashed (unprotected) until found calm: still seen
    third = P.fingerprint(a)
    assert third != second
    # a hash finds it unchanged (calm), the next protects it again, the one after is vouched for
    assert P.fingerprint(a) == third and P.fingerprint(a) == third
    vouched = t.vouched
    assert P.fingerprint(a) == third and t.vouched == vouched + 1
    a[0] = 5.0
    assert P.fingerprint(a) != third


@needs_tracking
def test_a_write_by_the_kernel_and_through_a_view_is_seen():
    a = np.zeros(BIG, dtype=np.uint8)
    tail = a[BIG // 2:]
    for _ in range(2):  # both tracked (protected at the second hash), overlapping
        whole, part = P.fingerprint(a), P.fingerprint(tail)
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"x" * 100)
        assert right.recv_into(memoryview(a)[BIG - 100:], 100) == 100  # the kernel writes the buffer
    assert P.fingerprint(tail) != part
    assert P.fingerprint(a) != whole  # protecting the view again did not hide the write from the whole


def test_fingerprint_is_the_same_with_and_without_tracking():
    code = ("import numpy as np; from pod_kernel import protocol as P;"
            f"a = np.arange({BIG // 8}, dtype=np.int64); P.fingerprint(a); print(P.fingerprint(a))")
    root = Path(__file__).resolve().parents[1]
    with_tracking = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                   check=False, cwd=root)
    without = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                             cwd=root, env={"KT_NO_WRITE_TRACKING": "1", "PATH": "/usr/bin:/bin"})
    assert with_tracking.returncode == 0 and without.returncode == 0, with_tracking.stderr + without.stderr
    assert with_tracking.stdout == without.stdout and with_tracking.stdout.startswith(("xxh3:", "b2:"))


@needs_tracking
def test_after_fork_each_side_sees_its_own_writes():
    a = np.zeros(BIG, dtype=np.uint8)
    first = P.fingerprint(a)
    assert P.fingerprint(a) == first  # protected now
    pid = os.fork()
    if pid == 0:  # the child: its own copy, its own tracker and hashing threads (the parent's are not here)
        signal.alarm(30)  # a child stuck on hashing threads it does not have dies, and the test fails
        a[0] = 9
        os._exit(0 if P.fingerprint(a) != first else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert P.fingerprint(a) == first  # the child's write was to its copy
    a[1] = 7  # a copy-on-write fault here: still a write
    assert P.fingerprint(a) != first


@needs_tracking
def test_a_received_buffer_seeded_with_its_senders_digest_is_vouched_for_until_written():
    t = W.tracker()
    buf = P._buffer(BIG)
    recvpool.populate(buf)
    arr = np.frombuffer(buf, dtype=np.uint8)
    arr[::4096] = 7  # "received" bytes
    digest = P.buffer_digest(memoryview(arr))
    assert t.seed(memoryview(buf), digest, buf)
    expected = P.fingerprint(arr.copy())
    before = t.vouched
    assert P.fingerprint(arr) == expected and t.vouched == before + 1  # not read: the seeded digest vouched
    arr[BIG // 3] = 1  # the cell writes it in place
    assert P.fingerprint(arr) != expected


def _send(array: np.ndarray, during=None) -> dict[int, bytes]:
    """Send ``array`` over a socket pair the way the bulk channel does (send_parts); ``during(reader_sock)``
    runs after the first piece went (the array is being sent)."""
    from pod_kernel import bulk

    a, b = socket.socketpair()
    got = bytearray()

    def drain() -> None:
        while chunk := b.recv(1 << 20):
            got.extend(chunk)

    import threading

    reader = threading.Thread(target=drain)
    reader.start()
    real = a.sendall
    sent = [0]

    def sendall(data) -> None:
        real(data)
        sent[0] += 1
        if sent[0] == 1 and during is not None:
            during()

    class Sock:
        def __getattr__(self, name):
            return getattr(a, name)

    sock = Sock()
    sock.sendall = sendall  # type: ignore[attr-defined]
    try:
        return bulk.send_parts(sock, [memoryview(array)])  # type: ignore[arg-type]
    finally:
        a.shutdown(socket.SHUT_WR)
        reader.join()
        a.close()
        b.close()


@needs_tracking
def test_a_sent_array_is_vouched_for_and_a_write_during_its_send_is_seen():
    """The sender protects a big part before reading it and vouches for the digest it took as it went: its next
    fingerprint reads nothing. A write made while it is sent (after its piece went) is still seen, and a buffer
    found rewritten is not protected at its next send (it would pay the page faults each time)."""
    t = W.tracker()
    a = np.zeros(SENT // 8)
    digests = _send(a)
    expected = P.fingerprint(a.copy())
    before = t.vouched
    assert digests and P.fingerprint(a) == expected and t.vouched == before + 1  # not read again

    def write() -> None:
        a[0] = 9.0  # its piece went already: the digest sent is of the old bytes

    _send(a, during=write)
    assert P.fingerprint(a) == P.fingerprint(a.copy()) != expected  # seen: hashed again, not vouched for
    a[1] = 3.0  # rewritten between sends: the next send leaves it unprotected
    assert not t.protect(memoryview(a))
    vouched = t.vouched
    _send(a)
    assert P.fingerprint(a) == P.fingerprint(a.copy()) and t.vouched == vouched  # hashed: always correct


@needs_tracking
def test_a_protection_armed_again_before_its_digest_is_recorded_vouches_for_nothing():
    t = W.tracker()
    a = np.zeros(SENT // 8)
    view = memoryview(a)
    first = t.protect(view)
    assert first
    a[5] = 1.0  # written after protect: the written mark says so...
    second = t.protect(view)  # ...until the range is armed again (another send of it), which clears it
    assert second and second != first
    assert not t.seed(view, b"digest of the bytes before the write", a, protected=first)  # so: not recorded
    assert t.seed(view, P.buffer_digest(memoryview(a).cast("B")), a, protected=second)  # the later one is
    assert P.fingerprint(a) == P.fingerprint(a.copy())


def test_a_big_tensor_enters_fingerprints_as_the_same_array_while_it_is_as_it_was():
    """The write tracker keeps a digest while the object that exported the buffer lives: a tensor's memory is
    exported by the array it travels as, kept per tensor (a new one per call made every cell hash it again)."""
    torch = pytest.importorskip("torch")
    x = torch.zeros(2 * P.TENSOR_ARRAY_MIN_BYTES // 4)

    def owner() -> object:
        return P._out_of_band(x)[1][0].raw().obj

    first = owner()
    assert owner() is first
    x.set_(torch.ones(len(x)))  # other memory: another array, and its bytes
    assert owner() is not first and P.fingerprint(x) == P.fingerprint(torch.ones(len(x)))
    x.data = torch.full((len(x),), 2.0)
    assert P.fingerprint(x) == P.fingerprint(torch.full((len(x),), 2.0))
    assert P.fingerprint(x.reshape(2, -1)) != P.fingerprint(x)  # a view of it: its own array, its own shape


@needs_tracking
def test_an_unchanged_tensor_is_vouched_for_and_its_writes_are_seen():
    torch = pytest.importorskip("torch")
    t = W.tracker()
    x = torch.zeros(BIG // 4)
    first = P.fingerprint(x)
    assert P.fingerprint(x) == first  # hashed again, and protected from now on
    before = t.vouched
    assert P.fingerprint(x) == first and t.vouched == before + 1  # not read again
    x[len(x) // 2] = 1.0  # in place, by torch
    assert P.fingerprint(x) == P.fingerprint(x.clone()) != first
    x.add_(1)
    assert P.fingerprint(x) == P.fingerprint(x.clone())


@needs_tracking
def test_a_digest_whose_owner_dies_in_a_collection_under_the_trackers_lock_is_dropped():
    """The tracker's finalizer took its lock: an owner that died in a garbage collection started by an allocation
    while that thread held the lock waited for it for ever."""
    from collect import dies_in_a_collection_under

    t = W.tracker()
    keys = []

    def array() -> np.ndarray:
        a = np.zeros(BIG // 8)
        P.fingerprint(a)
        keys.append(next(k for k, e in t._entries.items() if e.owner() is a))
        return a

    assert dies_in_a_collection_under(t._lock, array, lambda _id: keys[0] in t._entries) == [False]


def _mappings_to_ask_about(tmp_path):
    """Ranges over this process's mappings (each one, each with the next, each less its first page) after adding
    a shared anonymous map, a private file map and a private anonymous one; and the maps, to keep them alive."""
    maps = [mmap.mmap(-1, 1 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)]
    path = tmp_path / "file"
    path.write_bytes(b"\0" * (1 << 20))
    with open(path, "r+b") as f:
        maps.append(mmap.mmap(f.fileno(), 1 << 20, flags=mmap.MAP_PRIVATE))
    maps.append(mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    lines = [line.split()[0].split("-") for line in Path("/proc/self/maps").read_text().splitlines()]
    spans = [(int(lo, 16), int(hi, 16)) for lo, hi in lines]
    ranges = []
    for (lo, hi), after in zip(spans, spans[1:] + [None]):
        ranges.append((lo, hi))
        if after is not None:
            ranges.append((lo, after[1]))  # two mappings, or across a hole
        if hi - lo > mmap.PAGESIZE:
            ranges.append((lo + mmap.PAGESIZE, hi))
    return ranges, maps


@needs_tracking
def test_the_kernels_answer_on_a_range_is_the_one_proc_maps_gives(tmp_path):
    """Only private anonymous memory (the heap only when asked) is write-protected: PROCMAP_QUERY (Linux 6.11+,
    a few us) says what /proc/self/maps says (read through: 1-2.5 ms in a process with torch loaded), on every
    mapping of this process and across their joins and holes."""
    tracker = W.WriteTracker()
    ranges, maps = _mappings_to_ask_about(tmp_path)
    answers = [(tracker._private_anonymous(lo, hi, heap), W._private_anonymous(lo, hi, heap))
               for lo, hi in ranges for heap in (True, False)]
    if not tracker._query:
        pytest.skip("this kernel has no PROCMAP_QUERY (older than 6.11): /proc/self/maps is read instead")
    assert [a for a, _ in answers] == [b for _, b in answers]
    assert sum(a for a, _ in answers) >= 2 and sum(not a for a, _ in answers) >= 2  # both answers were given
    shared, private_file, private = (W._pages(W.buffer_address(memoryview(m)), len(m)) for m in maps)
    assert tracker._private_anonymous(*private, heap=False)
    assert not tracker._private_anonymous(*shared) and not tracker._private_anonymous(*private_file)
    for m in maps:
        m.close()


@needs_tracking
def test_a_kernel_that_does_not_know_the_query_is_answered_from_proc_maps(monkeypatch, tmp_path):
    tracker = W.WriteTracker()
    monkeypatch.setattr(W, "_PROCMAP_QUERY", W._iowr(0x66, 0x7F, 104))  # an ioctl no kernel has: ENOTTY
    ranges, maps = _mappings_to_ask_about(tmp_path)
    assert [tracker._private_anonymous(lo, hi) for lo, hi in ranges] == [W._private_anonymous(lo, hi)
                                                                          for lo, hi in ranges]
    assert not tracker._query
    for m in maps:
        m.close()
