"""Whether a big buffer was written since its digest was taken, without reading it again.

Fingerprinting an unchanged 1 GiB global hashes a gigabyte (~30 ms) on each
side at every re-run of its cell. Instead, once a big buffer of this process's
private anonymous memory has been hashed twice, its pages are write-protected with
Linux userfaultfd in asynchronous mode (``UFFD_FEATURE_WP_ASYNC``, Linux 6.7+):
a write to such a page is resolved by the kernel at once (no handler thread)
and marks the page written, and ``PAGEMAP_SCAN`` on ``/proc/self/pagemap``
answers "was any page of this range written?" in about 0.1 ms per GiB.

Every write goes through the page tables, whoever makes it: Python or C code,
the kernel (``recv_into``, ``read``), a copy-on-write after ``fork``, a
debugger's ``process_vm_writev``. Memory other mappings can change (files,
shared memory) is never tracked. A buffer found written is hashed from then on
without protection (the first write to each protected page costs a page fault,
~2 µs per 4 KiB: rewriting 1 GiB takes ~0.7 s instead of ~0.25 s here, so a
buffer rewritten between cells is cheaper to hash) until a hash finds it
unchanged again; a buffer hashed only once is never protected. Bytes that
cross the bulk channel are the exception, on both sides: the receiver
protects its buffer at once with the digest the sender sent (:meth:`seed`),
and the sender protects a part before it reads it and vouches for the digest
it took as it went (:meth:`protect`, then :meth:`seed`), unless that buffer
was found rewritten before; so the first re-run of a cell reading a value
just pushed or pulled reads nothing (it hashed 1 GiB twice, 70-80 ms each,
on its first two re-runs). Measured on a 1 GiB numpy array here, the first
in-place rewrite of protected pages costs ~250 ms instead of ~100 ms (numpy
asks for huge pages). Anything unexpected (no userfaultfd: an older
kernel, a seccomp profile; a range not ours; the exporting object gone) falls
back to hashing, which is always correct.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import platform
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Buffers at least this big are tracked (pod_kernel.protocol.BUFFER_DIGEST_MIN_BYTES: they enter fingerprints as
#: their own digest); smaller ones hash in ~0.1 ms.
TRACK_MIN_BYTES = 1 << 20
#: Smaller buffers are tracked only outside the heap (malloc gives one of a few MB the heap once its threshold
#: for a mapping of its own went up): there the pages at its ends hold other objects too, whose writes mark them
#: written, and the buffer would be hashed again after each cell for nothing.
TRACK_HEAP_MIN_BYTES = 64 << 20

_SYSCALL_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_UFFD_USER_MODE_ONLY = 1
_UFFD_API = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_PM_SCAN_CHECK_WPASYNC = 1 << 1
_PAGE_IS_WRITTEN = 1 << 1


def _iowr(kind: int, number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | number


_UFFDIO_API = _iowr(0xAA, 0x3F, 24)
_UFFDIO_REGISTER = _iowr(0xAA, 0x00, 32)
_UFFDIO_UNREGISTER = (2 << 30) | (16 << 16) | (0xAA << 8) | 0x01  # _IOR: the kernel only reads the range
_UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, 24)
_UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
_PAGEMAP_SCAN = _iowr(0x66, 16, 96)
_PROCMAP_QUERY = _iowr(0x66, 17, 104)
_PROCMAP_QUERY_VMA_SHARED = 1 << 3
#: Longest mapping name asked for: "[heap]" and "" are the two that matter; a longer one is some other mapping.
_NAME_BYTES = 64


class _ProcmapQuery(ctypes.Structure):
    """``struct procmap_query`` (linux/fs.h, Linux 6.11+): the mapping that holds one address."""

    _fields_ = [("size", ctypes.c_uint64), ("query_flags", ctypes.c_uint64), ("query_addr", ctypes.c_uint64),
                ("vma_start", ctypes.c_uint64), ("vma_end", ctypes.c_uint64), ("vma_flags", ctypes.c_uint64),
                ("vma_page_size", ctypes.c_uint64), ("vma_offset", ctypes.c_uint64), ("inode", ctypes.c_uint64),
                ("dev_major", ctypes.c_uint32), ("dev_minor", ctypes.c_uint32), ("vma_name_size", ctypes.c_uint32),
                ("build_id_size", ctypes.c_uint32), ("vma_name_addr", ctypes.c_uint64),
                ("build_id_addr", ctypes.c_uint64)]


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def buffer_address(data: memoryview) -> int:
    """The address of a contiguous buffer's first byte (read-only buffers too)."""
    view = _PyBuffer()
    ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(data), ctypes.byref(view), 0)
    try:
        return int(view.buf or 0)
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


@dataclass
class _Entry:
    start: int
    end: int
    digest: bytes
    owner: weakref.ref
    #: pages write-protected when the digest was taken: a clean scan vouches for it
    armed: bool
    #: not found written since it was first hashed, or the last hash found the same bytes as the one before:
    #: protected at the next hash
    calm: bool = False


class WriteTracker:
    """Digests of big buffers, kept while the kernel says no page of theirs was written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, int], _Entry] = {}
        #: ranges :meth:`protect` armed whose digest :meth:`seed` has not recorded yet (any other arming of
        #: their pages clears their written marks, and drops them from here)
        self._pending: dict[tuple[int, int], int] = {}
        self._protections = itertools.count(1)
        self._uffd = -1
        self._pagemap = -1
        self._maps = -1
        #: whether the kernel answers PROCMAP_QUERY (else /proc/self/maps is read through)
        self._query = True
        self._libc: Any = None
        self._pid = os.getpid()
        self.available = self._open()
        #: digests answered without reading the buffer (for tests and the benchmark)
        self.vouched = 0

    def _open(self) -> bool:
        number = _SYSCALL_USERFAULTFD.get(platform.machine())
        if number is None or not hasattr(os, "O_CLOEXEC") or os.environ.get("KT_NO_WRITE_TRACKING"):
            return False
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
            fd = libc.syscall(number, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY)
            if fd < 0:
                return False
            api = (ctypes.c_uint64 * 3)(_UFFD_API, _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED, 0)
            if libc.ioctl(fd, _UFFDIO_API, ctypes.byref(api)) != 0:
                os.close(fd)
                return False
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._maps = os.open("/proc/self/maps", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        self._uffd, self._libc = fd, libc
        return True

    def digest(self, data: memoryview, compute: Callable[[memoryview], bytes]) -> bytes:
        """``compute(data)``, or the digest taken before when no page of ``data`` was written since."""
        owner = data.obj
        if not self.available or data.nbytes < TRACK_MIN_BYTES or os.getpid() != self._pid:
            return compute(data)
        try:
            ref = weakref.ref(owner)
        except TypeError:  # an exporter we cannot watch die: its address could be reused unseen
            return compute(data)
        address = buffer_address(data)
        start, end = _pages(address, data.nbytes)
        key = (address, data.nbytes)
        with self._lock:
            entry = self._entries.get(key)
            # whatever keeps that memory alive (the array, another view of it, a received buffer): while it
            # lives the range is the same memory, and a clean scan says its bytes are the ones digested
            if entry is not None and entry.owner() is None:
                entry = None
            if entry is not None and entry.armed and self._unwritten(start, end):
                self.vouched += 1
                return entry.digest
            # protected from its second hash on, unless it was found written since: a buffer hashed once (a
            # fresh array sent once) or rewritten between hashes never pays the page faults of protection
            armed = entry is not None and not entry.armed and entry.calm and self._arm(key, start, end)  # writes seen
        result = compute(data)
        with self._lock:
            calm = entry is None or (not entry.armed and entry.digest == result)
            # an entry keeps its first owner, whose finalizer forgets it
            self._entries[key] = _Entry(start, end, result, ref if entry is None else entry.owner, armed, calm)
            if len(self._entries) > 1024:  # owners that died without their callback running
                for k, e in self._entries.copy().items():  # a copy: a finalizer may drop an entry meanwhile
                    if e.owner() is None:
                        self._entries.pop(k, None)
        if entry is None:
            weakref.finalize(owner, self._forget, key)
        return result

    def seed(self, data: memoryview, digest: bytes, owner: object, protected: int = 0) -> bool:
        """Vouch for ``digest`` as ``data``'s from now on: bytes just received, whose digest the sender sent
        with them (a bulk trailer), or just sent, whose digest was taken as they went. The pages are
        write-protected at once (``protected``: what :meth:`protect` returned before the digest was taken;
        then only if nothing armed them since), so the next :meth:`digest` of them reads nothing unless they
        were written since; ``owner`` keeps the memory alive (the receive buffer, the array sent). A value
        pushed is mostly read by the cells that use it, and its first check after a cell then costs ~0.1 ms
        instead of a full hash; code that rewrites it in place pays the protection's page faults once (1 GiB:
        ~0.25 s instead of ~0.1 s here). False where the range cannot be tracked (or ``protected`` no longer holds)."""
        if not self.available or data.nbytes < TRACK_MIN_BYTES or os.getpid() != self._pid:
            return False
        try:
            ref = weakref.ref(owner)
        except TypeError:
            return False
        address = buffer_address(data)
        start, end = _pages(address, data.nbytes)
        key = (address, data.nbytes)
        with self._lock:
            if protected:
                if self._pending.get(key) != protected:  # armed again since: a write before would go unseen
                    return False
                del self._pending[key]
            elif not self._arm(key, start, end):
                return False
            self._entries[key] = _Entry(start, end, digest, ref, armed=True, calm=True)
        weakref.finalize(owner, self._forget, key)
        return True

    def protect(self, data: memoryview) -> int:
        """Write-protect ``data``'s pages now, before its bytes are read for a digest that :meth:`seed` records
        once it is known: a write from now on is seen, even one made while the digest is taken. Not for a buffer
        found rewritten since its digest before (it would pay the page faults at every send: it is hashed
        instead). Returns what :meth:`seed` takes as ``protected``; 0 where the range cannot be tracked."""
        if not self.available or data.nbytes < TRACK_MIN_BYTES or os.getpid() != self._pid:
            return 0
        address = buffer_address(data)
        start, end = _pages(address, data.nbytes)
        key = (address, data.nbytes)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.owner() is not None and not entry.calm:
                return 0
            if not self._arm(key, start, end):
                return 0
            if entry is not None:
                entry.armed = False  # written marks cleared: it vouches no more (seed replaces it)
            if len(self._pending) >= 1024:  # sends that never seeded (failed): forgetting them is always safe
                self._pending.clear()
            token = self._pending[key] = next(self._protections)
        return token

    def _drop_pending(self, start: int, end: int) -> None:
        """[start, end) was armed or unprotected: protections pending there lost their written marks."""
        self._pending = {k: v for k, v in self._pending.items() if not (k[0] < end and start < k[0] + k[1])}

    def unprotect(self, buf: Any) -> None:
        """Lift write protection from ``buf``'s pages and forget digests there: memory about to be reused for
        other bytes (a receive buffer), which would otherwise fault on every page it is written."""
        if not self.available or os.getpid() != self._pid:
            return
        with memoryview(buf) as view:
            start, end = _pages(buffer_address(view), view.nbytes)
        with self._lock:
            for k, e in self._entries.copy().items():  # a copy: a finalizer may drop an entry meanwhile
                if e.start < end and start < e.end:
                    self._entries.pop(k, None)
            self._drop_pending(start, end)
            whole = (ctypes.c_uint64 * 2)(start, end - start)
            self._libc.ioctl(self._uffd, _UFFDIO_UNREGISTER, ctypes.byref(whole))  # not registered: a no-op

    def _forget(self, key: tuple[int, int]) -> None:
        # without the lock: a finalizer runs wherever its object dies, also in a garbage collection that an
        # allocation started while this thread held the lock (a plain lock waited for itself there, for good)
        entry = self._entries.get(key)
        if entry is not None and entry.owner() is None:
            self._entries.pop(key, None)

    def _unwritten(self, start: int, end: int) -> bool:
        """No page of [start, end) written since it was protected (and the range is still ours)."""
        region = (ctypes.c_uint64 * 3)()
        arg = (ctypes.c_uint64 * 12)(96, _PM_SCAN_CHECK_WPASYNC, start, end, 0, ctypes.addressof(region), 1,
                                     0, 0, _PAGE_IS_WRITTEN, 0, _PAGE_IS_WRITTEN)
        return self._libc.ioctl(self._pagemap, _PAGEMAP_SCAN, ctypes.byref(arg)) == 0

    def _arm(self, key: tuple[int, int], start: int, end: int) -> bool:
        """Write-protect [start, end) for ``key`` (registering it first; under the lock); False when it is not
        plain private memory. Arming clears the written marks of those pages: other entries there vouch no more,
        and protections pending there (:meth:`protect`) are void."""
        if not self._private_anonymous(start, end, heap=end - start >= TRACK_HEAP_MIN_BYTES):
            return False
        register = (ctypes.c_uint64 * 4)(start, end - start, _UFFDIO_REGISTER_MODE_WP, 0)
        if self._libc.ioctl(self._uffd, _UFFDIO_REGISTER, ctypes.byref(register)) != 0:
            return False
        protect = (ctypes.c_uint64 * 3)(start, end - start, _UFFDIO_WRITEPROTECT_MODE_WP)
        if self._libc.ioctl(self._uffd, _UFFDIO_WRITEPROTECT, ctypes.byref(protect)) != 0:
            return False
        for other_key, other in self._entries.copy().items():
            if other_key != key and other.start < end and start < other.end:
                other.armed = False
        self._drop_pending(start, end)
        return True


    def _private_anonymous(self, start: int, end: int, heap: bool = True) -> bool:
        """Whether [start, end) lies in private anonymous mappings only (nothing else can write their pages); in
        the heap only if ``heap``. Asks the kernel for the mappings there (PROCMAP_QUERY, ~5 us each) where it
        answers: reading /proc/self/maps through cost 1-2.5 ms in a process with torch loaded (~650 mappings),
        at every fresh 1 MiB value a cell read twice."""
        if not self._query:
            return _private_anonymous(start, end, heap)
        name = ctypes.create_string_buffer(_NAME_BYTES)
        query = _ProcmapQuery(size=ctypes.sizeof(_ProcmapQuery), vma_name_addr=ctypes.addressof(name))
        covered = start
        while covered < end:
            query.query_flags, query.query_addr, query.vma_name_size = 0, covered, _NAME_BYTES  # the one holding it
            if self._libc.ioctl(self._maps, _PROCMAP_QUERY, ctypes.byref(query)) != 0:
                if ctypes.get_errno() in (errno.ENOENT, errno.ENAMETOOLONG):  # a hole; a long name: not plain
                    return False
                self._query = False  # an older kernel (ENOTTY, EINVAL): read the maps from now on
                return _private_anonymous(start, end, heap)
            label = name.value if query.vma_name_size else b""
            if (query.vma_flags & _PROCMAP_QUERY_VMA_SHARED or query.inode or query.dev_major or query.dev_minor
                    or label not in (b"", b"[heap]" if heap else b"")):
                return False
            covered = query.vma_end
        return True


def _pages(address: int, nbytes: int) -> tuple[int, int]:
    """The page-aligned range holding [address, address + nbytes)."""
    return address - address % mmap.PAGESIZE, -(-(address + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE


def _private_anonymous(start: int, end: int, heap: bool = True) -> bool:
    """:meth:`WriteTracker._private_anonymous` from /proc/self/maps, on kernels without PROCMAP_QUERY."""
    covered = start
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if hi <= covered or lo >= end:
                continue
            if lo > covered or fields[1][3] != "p" or (len(fields) > 5 and fields[5].strip() not in
                                                       ("", "[heap]" if heap else "")):
                return False
            covered = hi
            if covered >= end:
                return True
    return False


_tracker: WriteTracker | None = None
_tracker_lock = threading.Lock()


def tracker() -> WriteTracker:
    """This process's tracker (opened on first use; a forked child opens its own)."""
    global _tracker
    with _tracker_lock:
        if _tracker is None or _tracker._pid != os.getpid():
            _tracker = WriteTracker()
        return _tracker
