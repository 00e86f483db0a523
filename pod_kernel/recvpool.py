"""Big receive buffers kept for the next receive: memory already faulted in instead of fresh pages.

A new 1 GiB value needs 1 GiB of new memory, and the kernel zeroes each page
of it on first touch: ~120 ms per GiB here with huge pages (~290 ms with
4 KiB pages), close to half of what loopback TCP takes to move the bytes. A
cell that pushes a new array of the same shape each time (a loop over
batches, a benchmark) would pay that every time. So the anonymous maps big
values are received into (``protocol._buffer``) are lent from this pool:
when the value living in one is gone (replaced by the next push of its name,
deleted), the map is not unmapped at once but kept, and the next receive of
exactly that size takes it, faulted in and ready.

A map is free when nothing but the pool refers to it: every array, view or
bundle built on it holds a reference (CPython's reference count says so
without walking anything). Free maps are kept at most :data:`IDLE_TTL_S` and
at most :func:`idle_cap_bytes` in all (oldest unmapped first); a thread of
the pool checks once a second. Write protection (``write_tracking``) left on
a reused map is lifted before it is handed out, so the receive does not
fault on every page. ``KT_RECV_POOL_BYTES=0`` turns the pool off.

A name pushed again in a loop needs two maps: its old value is still held
while the new one arrives, so only from the third push on is a free map
there to reuse. After a receive of at least :data:`SPARE_MIN_BYTES` into
fresh memory, the pool therefore faults one more map of that size in ahead,
in a low-priority thread, with the GIL released (:func:`populate`): a
*spare* the next receive of that size takes. Only when no map of that size
is free or being made, the cap holds it, and the memory left is at least
twice its size; an unused spare is unmapped like any free map.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import write_tracking

log = logging.getLogger("pod_kernel.recvpool")

#: Maps at least this big are lent from the pool: every map a value is received into (``protocol.MMAP_MIN_BYTES``;
#: smaller values live in bytes objects). Even 1 MiB of fresh pages took 0.1-0.3 ms to fault in here.
POOL_MIN_BYTES = 1 << 20
#: A receive looks at most this many maps of its size for a free one (newest first): a notebook holding
#: thousands of same-sized pushed arrays does not make every receive walk them all.
TAKE_SCAN_MAX = 64
#: A free map nobody took within this long is unmapped.
IDLE_TTL_S = 60.0
#: How often the pool's thread unmaps what it may not keep.
TICK_S = 1.0
#: Largest default idle cap (bytes) whatever the memory.
MAX_DEFAULT_CAP_BYTES = 4 << 30
#: A receive this big into fresh memory has a spare of its size faulted in ahead (see above): faulting 1 GiB
#: in took 160-220 ms here, two thirds of what loopback TCP takes to move it.
SPARE_MIN_BYTES = 64 << 20
#: Nice value of the thread that faults a spare in (it yields the CPU to the cell and the transfers).
SPARE_NICE = 10
#: Bytes faulted in per madvise call (:func:`populate`): the call holds the process's memory-map lock.
POPULATE_CHUNK_BYTES = 32 << 20
#: madvise(2) advice Python's mmap module does not name: fault the whole range in now, writable (Linux 5.14+).
MADV_POPULATE_WRITE = 23


#: Where this process's cgroup's memory files are (a container sees its own cgroup there).
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: A cgroup v1 limit this big means "no limit" (v1 writes one close to 2**63).
_NO_LIMIT = 1 << 60


def _cgroup_memory() -> tuple[int, int] | None:
    """(limit, usage) in bytes of this process's cgroup when it has a memory limit (cgroup v2, else v1)."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (CGROUP_ROOT / limit_file).read_text().strip()
            if not limit.isdigit() or int(limit) >= _NO_LIMIT:  # "max" (v2), or v1's "unlimited"
                continue
            return int(limit), int((CGROUP_ROOT / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def _memory_limit() -> int:
    """This process's memory limit: its cgroup's when it has one, else the machine's."""
    cgroup = _cgroup_memory()
    if cgroup is not None:
        return cgroup[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _memory_left() -> int:
    """Bytes this process may still fault in: what the machine has available, and at most its cgroup's limit
    less its usage when it has a limit."""
    import psutil

    left = int(psutil.virtual_memory().available)
    cgroup = _cgroup_memory()
    return left if cgroup is None else min(left, cgroup[0] - cgroup[1])


def new_map(size: int) -> mmap.mmap:
    """A private anonymous map of ``size`` bytes, advised to huge pages where the kernel gives them (512x fewer
    faults); no memory is committed until it is touched or populated (:func:`populate`)."""
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    huge = getattr(mmap, "MADV_HUGEPAGE", None)
    if huge is not None:
        with contextlib.suppress(OSError):  # THP compiled out: 4 KiB pages it is
            buf.madvise(huge)
    return buf


_libc: Any = None


def populate(buf: mmap.mmap, stop: threading.Event | None = None,
             on_chunk: Callable[[int], None] | None = None) -> None:
    """Fault every page of ``buf`` in now, with the GIL released (``mmap.madvise`` holds it: faulting 1 GiB in
    stalled every other thread of the process for 0.2-0.6 s), :data:`POPULATE_CHUNK_BYTES` per call: one call
    holds the process's memory-map lock throughout, and any ``mprotect`` (write tracking) or ``mmap`` of
    another thread waited for all of it (1 GiB: 1.25 s here, against 24 ms at most with chunks). ``stop`` set:
    it ends after the chunk in progress. The map cannot be closed meanwhile: the call holds an export of it.
    Kernels before 5.14 get a byte written per page instead."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    size = len(buf)
    if not size:
        return
    held = ctypes.c_char.from_buffer(buf)  # an export: close() fails until it goes, so the pages stay mapped
    try:
        base = ctypes.addressof(held)
        advise = True
        for start in range(0, size, POPULATE_CHUNK_BYTES):
            if stop is not None and stop.is_set():
                return
            end = min(start + POPULATE_CHUNK_BYTES, size)
            if advise and _libc.madvise(base + start, end - start, MADV_POPULATE_WRITE) != 0:
                advise = False  # no MADV_POPULATE_WRITE here: touch the pages instead
            if not advise:
                for offset in range(start, end, mmap.PAGESIZE):
                    buf[offset] = 0
            if on_chunk is not None:
                on_chunk(end)
    finally:
        del held


def idle_cap_bytes() -> int:
    """Most bytes of free maps kept: ``KT_RECV_POOL_BYTES`` when it is a number, else an eighth of the memory
    limit, at most :data:`MAX_DEFAULT_CAP_BYTES`."""
    raw = os.environ.get("KT_RECV_POOL_BYTES", "").strip()
    if raw.isdigit():
        return int(raw)
    return min(MAX_DEFAULT_CAP_BYTES, _memory_limit() // 8)


@dataclass
class _Lent:
    buf: mmap.mmap
    #: when it was first seen free (None: in use)
    free_since: float | None = None


@dataclass
class RecvPool:
    """The maps lent for receives, and the free ones among them."""

    cap_bytes: int = field(default_factory=idle_cap_bytes)
    _lent: list[_Lent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    #: receives that got a reused map, spares included (for tests and the benchmark)
    reused: int = 0
    #: spares faulted in ahead (see the module's docstring)
    spared: int = 0
    #: sizes of the spares being faulted in now
    _making: list[int] = field(default_factory=list)

    def take(self, size: int) -> mmap.mmap | None:
        """A free map of exactly ``size`` bytes, unprotected and faulted in; None when there is none."""
        if self.cap_bytes <= 0:
            return None
        with self._lock:
            same = [lent for lent in reversed(self._lent) if len(lent.buf) == size and not lent.buf.closed]
            for lent in same[:TAKE_SCAN_MAX]:
                if self._free(lent):
                    lent.free_since = None
                    self.reused += 1
                    buf = lent.buf
                    break
            else:
                return None
        write_tracking.tracker().unprotect(buf)  # a receive must not fault on every page it writes
        return buf

    def lend(self, buf: mmap.mmap) -> None:
        """Keep ``buf`` (a new receive map) for reuse once its value is gone."""
        if self.cap_bytes <= 0 or len(buf) < POOL_MIN_BYTES:
            return
        with self._lock:
            self._lent.append(_Lent(buf))
        self._start_thread()

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kt-recv-pool", daemon=True)
                self._thread.start()

    def ready_spare(self, size: int) -> bool:
        """After a receive of ``size`` bytes into fresh memory: fault a spare map of that size in ahead, in a
        thread, when the module's conditions hold (see its docstring); whether one is being made."""
        if self.cap_bytes <= 0 or size < SPARE_MIN_BYTES:
            return False
        with self._lock:
            free = list(map(len, self._free_maps()))
            if size in self._making or size in free or sum(free) + sum(self._making) + size > self.cap_bytes:
                return False
            self._making.append(size)
        if _memory_left() < 2 * size:
            with self._lock:
                self._making.remove(size)
            return False
        threading.Thread(target=self._make_spare, args=(size,), name="kt-recv-spare", daemon=True).start()
        return True

    def _make_spare(self, size: int) -> None:
        with contextlib.suppress(OSError, AttributeError):  # yield to the cell and the transfers
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SPARE_NICE)
        buf = None
        try:
            buf = new_map(size)
            populate(buf)
        except (OSError, MemoryError, ValueError):
            log.debug("receive pool: no spare of %d bytes", size, exc_info=True)
            if buf is not None:
                buf.close()
            buf = None
        with self._lock:
            self._making.remove(size)
            if buf is not None:
                self._lent.append(_Lent(buf, free_since=time.monotonic()))
                self.spared += 1
        if buf is not None:
            self._start_thread()

    def _free(self, lent: _Lent) -> bool:
        """Whether only the pool refers to the map: no value, view or bundle is built on it any more."""
        return _references(lent) <= _FREE_REFERENCES

    def _free_maps(self) -> list[mmap.mmap]:
        """The maps kept and free now (under the lock)."""
        return [lent.buf for lent in self._lent if not lent.buf.closed and self._free(lent)]

    def idle_bytes(self) -> int:
        """Bytes of free maps kept now."""
        with self._lock:
            return sum(map(len, self._free_maps()))

    def trim(self, now: float | None = None) -> int:
        """Unmap free maps past :data:`IDLE_TTL_S` or beyond the cap (oldest first); how many went."""
        now = time.monotonic() if now is None else now
        with self._lock:
            keep: list[_Lent] = []
            free: list[_Lent] = []
            for lent in self._lent:
                if lent.buf.closed:
                    continue
                if not self._free(lent):
                    lent.free_since = None
                    keep.append(lent)
                    continue
                lent.free_since = now if lent.free_since is None else lent.free_since
                free.append(lent)
            free.sort(key=lambda lent: lent.free_since or now, reverse=True)  # newest first
            kept_bytes = 0
            dropped: list[_Lent] = []
            for lent in free:
                if now - (lent.free_since or now) < IDLE_TTL_S and kept_bytes + len(lent.buf) <= self.cap_bytes:
                    kept_bytes += len(lent.buf)
                    keep.append(lent)
                else:
                    dropped.append(lent)
            self._lent = keep
        for lent in dropped:
            write_tracking.tracker().unprotect(lent.buf)
            lent.buf.close()
        return len(dropped)

    def _run(self) -> None:
        while True:
            time.sleep(TICK_S)
            try:
                self.trim()
            except Exception:  # never let the pool's thread die: maps would then be kept forever
                log.exception("receive pool: trimming failed; trying again in %g s", TICK_S)


def _references(lent: _Lent) -> int:
    return sys.getrefcount(lent.buf)


#: What :func:`_references` says of a map only a pool entry holds, measured (not assumed) on this interpreter.
_FREE_REFERENCES = _references(_Lent(mmap.mmap(-1, mmap.PAGESIZE)))

_pool: RecvPool | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def pool() -> RecvPool:
    """This process's pool (a forked child starts its own: the parent's thread is not there)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool, _pool_pid = RecvPool(), os.getpid()
        return _pool
