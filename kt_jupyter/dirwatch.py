"""Whether Python sources under some directories may have changed: Linux inotify, else "always".

``%%kt`` syncs the user's code before every cell (:mod:`kt_jupyter.codesync`);
proving a tree unchanged by ``stat``-ing every file costs ~0.3 ms for a
hundred files, and three times that in a busy ipykernel, where each ``stat``
gives up the GIL to the kernel's other threads. An inotify watch on each
directory walked says the same for one ``read`` that finds nothing.

It answers "nothing changed" only when it can be sure: on Linux, for
directories on local filesystems (ext4, xfs, btrfs, tmpfs, overlay, ...),
where every write through the kernel is an event. A network or FUSE
filesystem (NFS, SMB, virtiofs, sshfs) does not report another machine's
edits, and a platform without inotify has no events at all: there, and
whenever a watch cannot be added (the inotify limits), an event queue
overflows or a watched directory goes away, :meth:`DirWatch.changed` says
True, and the caller does its full check as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import sys
import threading
from collections.abc import Iterable
from functools import lru_cache

#: Filesystems whose every change is an inotify event on this machine.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "overlay", "zfs", "f2fs",
                               "jfs", "reiserfs", "bcachefs"})

_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF = 0x400, 0x800
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ISDIR = 0x4000, 0x8000, 0x40000000
_MASK = (_IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
         | _IN_DELETE_SELF | _IN_MOVE_SELF)
#: Events that count whatever the name: the directory itself went away, a watch ended, events were lost (the
#: caller then checks everything, and watches the directories it finds).
_ALWAYS = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_Q_OVERFLOW | _IN_IGNORED | _IN_ISDIR
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
#: inotify instances this process opens at most (one per compute it syncs code to); the user's limit is
#: shared with every program of theirs (128 by default), so more computes check their trees by ``stat``.
MAX_INSTANCES = 8
_open_instances = 0
_instances_lock = threading.RLock()  # reentrant: a collected watcher may close inside another's open


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1, libc.inotify_add_watch  # noqa: B018  (both there, or no inotify)
    except (OSError, AttributeError):
        return None
    return libc


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of this process's mounts, longest mount point first."""
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if "-" not in fields[6:]:
                    continue
                sep = fields.index("-", 6)
                point = fields[4].encode().decode("unicode_escape")  # \040 for a space, ...
                found.append((point, fields[sep + 1]))
    except OSError:
        return []
    return sorted(found, key=lambda m: len(m[0]), reverse=True)


def filesystem_type(path: str, mounts: list[tuple[str, str]]) -> str | None:
    """The type of the filesystem holding ``path`` (a real path), from :func:`_mounts`'s list."""
    for point, kind in mounts:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            return kind
    return None


class DirWatch:
    """Watches on directories (not recursive): :meth:`changed` says whether a ``.py`` file or a
    subdirectory in one of them may have changed since the last call."""

    def __init__(self) -> None:
        self._fd = -1  # opened by the first watch
        self._by_wd: dict[int, str] = {}  # watch descriptor -> directory
        self._watched: set[str] = set()
        self._mounts: list[tuple[str, str]] | None = None
        #: whether every directory asked for is watched (else :meth:`changed` is always True)
        self.usable = _libc() is not None

    def _open(self) -> bool:
        global _open_instances
        libc = _libc()
        with _instances_lock:
            if libc is None or _open_instances >= MAX_INSTANCES:
                return False
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd < 0:
                return False
            self._fd = fd
            _open_instances += 1
        return True

    def watch(self, directories: Iterable[str]) -> int:
        """Watch these directories too; how many were not watched before. A directory that cannot be
        watched (another filesystem, the inotify limits) makes this watcher unusable for good."""
        libc = _libc()
        added = 0
        if self.usable and self._fd < 0 and not self._open():
            self.usable = False
        for directory in directories:
            if not self.usable or libc is None:
                return added
            if directory in self._watched:
                continue
            if self._mounts is None:
                self._mounts = _mounts()
            if filesystem_type(os.path.realpath(directory), self._mounts) not in LOCAL_FILESYSTEMS:
                self.usable = False
                return added
            wd = libc.inotify_add_watch(self._fd, os.fsencode(directory), _MASK)
            if wd < 0:
                if ctypes.get_errno() != errno.ENOENT:  # ENOSPC: the watch limit
                    self.usable = False
                continue  # gone already: the walk that follows sees that
            self._by_wd[wd] = directory
            self._watched.add(directory)
            added += 1
        return added

    def changed(self) -> bool:
        """Whether anything that matters happened in the watched directories since the last call (reads
        every pending event); always True when not :attr:`usable`."""
        if not self.usable or self._fd < 0:  # unusable, or watching nothing yet
            return True
        changed = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return changed
            except OSError:
                self.usable = False
                return True
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size: offset + _EVENT.size + size].rstrip(b"\0")
                offset += _EVENT.size + size
                if mask & _IN_IGNORED:  # that directory is gone (or moved): watched again if it comes back
                    self._watched.discard(self._by_wd.pop(wd, ""))
                if mask & _ALWAYS or name.endswith(b".py"):
                    changed = True

    def close(self) -> None:
        """Stop watching (the file descriptor goes back now, not when this object is collected)."""
        global _open_instances
        with _instances_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
                _open_instances -= 1
        self.usable = False

    def __del__(self) -> None:
        self.close()
