"""The pod kernel's log file, rotated and capped from inside the kernel, so it never fills the disk.

``python -m pod_kernel --log-file PATH`` points file descriptors 1 and 2 at
``PATH`` (append mode), so everything lands there: server events, cell output
teed by the outbox, and what the interpreter or a C library writes straight to
the descriptors (a crash's last words are never lost to a rotation scheme that
reopens files). Rotation is copy-truncate: shift ``PATH.1`` -> ``PATH.2`` ...,
copy ``PATH`` (its last ``max_bytes``) to ``PATH.1``, truncate ``PATH`` (writers
append, so they carry on at the new end). It runs when the file passes
``max_bytes``, checked cheaply after teed writes and every
:data:`CHECK_INTERVAL_S` for direct writes. When the copy fails (a full disk)
the log is just truncated. One teed write is cut to its tail: a 200 MB print
costs the log at most a quarter of ``max_bytes``.

Without ``--log-file`` (Kubernetes: the runtime collects and rotates stdout)
nothing is rotated; teed output still goes to stdout/stderr.

Every line of teed cell output starts with :data:`CELL_MARKER`, so a reader
of the log (the notebook's panel) can tell it from the kernel's own lines:
timestamped server events, and what reaches the descriptors untouched (a
crash's last words, a subprocess), which stay unmarked. A line a cell left
open is closed before another writer's line would join it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import threading
from typing import Any

#: Rotate past this many bytes (``--log-max-bytes``, ``KT_LOG_MAX_BYTES``).
LOG_MAX_BYTES = 10 << 20
#: Rotated copies kept (``--log-backups``, ``KT_LOG_BACKUPS``).
LOG_BACKUPS = 3
#: Smallest size accepted for ``max_bytes``.
LOG_MIN_BYTES = 4096
#: Most rotated copies accepted.
LOG_MAX_BACKUPS = 100
#: How often the size is checked for writes that bypass the tee (C code, subprocesses).
CHECK_INTERVAL_S = 1.0
#: Teed bytes between two size checks.
CHECK_EVERY_BYTES = 64 << 10
#: Bytes copied per call while rotating.
COPY_BYTES = 1 << 20
#: What starts every line of cell output in the log.
CELL_MARKER = "[cell] "


class RotatingLog:
    """The log file behind fds 1 and 2, rotated copy-truncate style past ``max_bytes``."""

    def __init__(self, path: str, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.rotations = 0
        self._since_check = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def install(self) -> None:
        """Point fds 1 and 2 at the file (append mode, 0600) and start the periodic check."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        for stream in (sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.check()
        threading.Thread(target=self._watch, name="kt-log-rotate", daemon=True).start()

    def stop(self) -> None:
        """End the periodic check."""
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            self.check()

    def fit(self, text: str) -> str:
        """``text`` as one write to the log may hold it: the tail of a huge write, with a note."""
        keep = self.max_bytes // 4
        if len(text) <= keep:
            return text
        return f"[kt: {len(text) - keep} characters of one write are not in this log]\n" + text[-keep:]

    def wrote(self, nbytes: int) -> None:
        """``nbytes`` were written; the size is checked every :data:`CHECK_EVERY_BYTES`."""
        self._since_check += nbytes
        if self._since_check >= CHECK_EVERY_BYTES:
            self.check()

    def check(self) -> None:
        """Rotate when the file is past ``max_bytes`` (any thread)."""
        with self._lock:
            self._since_check = 0
            try:
                if os.fstat(1).st_size > self.max_bytes:
                    self._rotate()
            except OSError:
                pass  # fd 1 gone or not a file: nothing to rotate

    def full(self) -> None:
        """A write found the disk full: make room by rotating now (the copy fails there, so it truncates)."""
        with self._lock:
            self._rotate()

    def _rotate(self) -> None:
        try:
            if self.backups:
                for i in range(self.backups - 1, 0, -1):
                    try:
                        os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
                    except FileNotFoundError:
                        pass
                self._copy(f"{self.path}.1")
        except OSError:
            pass  # a full disk (or a vanished directory): truncating below still bounds the log
        finally:
            try:
                os.ftruncate(1, 0)
                self.rotations += 1
            except OSError:
                pass  # fd 1 is not a file (a pipe): nothing to truncate

    def _copy(self, dest: str) -> None:
        """Copy the log's last ``max_bytes`` (through fd 1's file, even if renamed) to ``dest``."""
        src = os.open("/proc/self/fd/1" if os.path.exists("/proc/self/fd/1") else self.path,
                      os.O_RDONLY | os.O_CLOEXEC)
        try:
            offset = max(0, os.fstat(src).st_size - self.max_bytes)  # a burst between checks: its tail
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if offset:
                    os.write(out, f"[kt: {offset} earlier bytes of this log were dropped]\n".encode())
                while sent := os.sendfile(out, src, offset, COPY_BYTES):
                    offset += sent
            except OSError:
                os.unlink(dest)  # a partial copy helps nobody and holds the space we need
                raise
            finally:
                os.close(out)
        finally:
            os.close(src)


#: The installed log, when ``--log-file`` was given.
ACTIVE: RotatingLog | None = None


def install(path: str, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> RotatingLog:
    """Make ``path`` the kernel's log (fds 1 and 2), rotated past ``max_bytes`` keeping ``backups`` copies."""
    global ACTIVE
    log = RotatingLog(path, max_bytes, backups)
    log.install()
    ACTIVE = log
    return log


def mark_lines(text: str, line_open: bool) -> str:
    """``text`` with :data:`CELL_MARKER` at the start of each of its lines; ``line_open``: its first line
    continues a line already marked."""
    if "\n" not in text:
        return text if line_open or not text else CELL_MARKER + text
    head = "" if line_open else CELL_MARKER
    body = text.replace("\n", "\n" + CELL_MARKER)
    return head + (body[:-len(CELL_MARKER)] if text.endswith("\n") else body)


class _CellLines:
    """The line teed cell output left open: its stream, and the log file's size after it (-1: not a file)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open_stream: str | None = None
        self.end = -1


_lines = _CellLines()


class _EndsCellLines:
    """A logging handler's stream that ends a line a cell left open before it writes a record."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        with _lines.lock:
            if _lines.open_stream is not None:
                text, _lines.open_stream = "\n" + text, None
            return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


_logging_guarded = False


def guard_logging() -> None:
    """Make the logging handlers on the real stdout/stderr (the pod kernel's own loggers') end an open cell
    line before each record (once; :func:`tee` calls it), so a server event never lands inside a line of
    cell output."""
    global _logging_guarded
    if _logging_guarded:
        return
    _logging_guarded = True
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
                sys.__stdout__, sys.__stderr__):
            handler.setStream(_EndsCellLines(handler.stream))


def _size(fd: int) -> int:
    try:
        st = os.fstat(fd)
    except OSError:
        return -1
    return st.st_size if stat.S_ISREG(st.st_mode) else -1  # a pipe (Kubernetes) has no size to compare


def tee(name: str, text: str) -> None:
    """Write a cell's output to the kernel's real stdout/stderr (the log), each line marked with
    :data:`CELL_MARKER`: never raises, never grows the log unbounded.

    A line left open is ended first when the other stream writes, when a
    server event is logged (:func:`guard_logging`), or when the file grew by
    someone else's write since (C code, a subprocess).
    """
    log = ACTIVE
    stream = sys.__stdout__ if name == "stdout" else sys.__stderr__
    if stream is None or not text:
        return
    if log is not None:
        text = log.fit(text)
    guard_logging()
    with _lines.lock:
        try:
            fd = stream.fileno()
        except (OSError, ValueError):
            fd = -1
        lead, line_open = "", False
        if _lines.open_stream is not None:
            if _lines.open_stream != name or (_lines.end >= 0 and _size(fd) != _lines.end):
                lead = "\n"  # another writer came in between: our open line ends here
            else:
                line_open = True
        out = lead + mark_lines(text, line_open)
        try:
            stream.write(out)
            stream.flush()
        except OSError as exc:
            _lines.open_stream = None
            if log is not None and exc.errno == errno.ENOSPC:
                log.full()
            return
        except ValueError:  # closed at exit
            return
        if out.endswith("\n"):
            _lines.open_stream = None
        else:
            _lines.open_stream, _lines.end = name, _size(fd)
    if log is not None:
        log.wrote(len(out))
