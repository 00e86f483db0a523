"""Cells' source files: where a name from the wire may put one, how many are kept, and writes that fail.

A cell's source is written to a file before it runs once a debugger listens,
so an IDE can set breakpoints in it; until then the newest cells' sources
wait in memory and are written when debugpy starts (tracebacks and pdb quote
a cell's lines from IPython's line cache either way). The name comes from the
client, so it is confined here, in one place:

- a relative name (``kt-cell-7.py``) becomes a sanitized basename inside the
  cells directory; nothing else;
- an absolute name is accepted only in the shape JupyterLab's debugger gives
  its cells (:func:`ipykernel.compiler.get_file_name`):
  ``<dir>/ipykernel_<pid>/<digits>.py``, normalized, where ``<dir>`` already
  exists; ``ipykernel_<pid>`` is created 0700 or must be a real directory
  owned by this user; the file is created with ``O_EXCL | O_NOFOLLOW`` and an
  existing one is kept (the panel wrote it and set breakpoints in it).

Only the newest :data:`CELLS_KEPT` files stay in the cells directory
(``KT_CELLS_KEPT`` overrides): ten thousand cells do not leave ten thousand files.

A write that fails (a full disk, a read-only or vanished directory) never
kills the kernel: a cell in the cells directory runs from memory (tracebacks
read IPython's line cache) with a warning that names the path, the error and
the free space on that disk; a debugger path that cannot be written is an
error for that cell, since its breakpoints would silently never hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import threading
from collections import OrderedDict
from pathlib import Path

#: Newest cell files kept in the cells directory; older ones are deleted.
CELLS_KEPT = 200
#: Longest cell file name kept from the wire (characters).
NAME_MAX_CHARS = 100
#: Cell names whose path :meth:`CellFiles.path` remembers.
NAMES_KEPT = 256

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_DEBUGGER_DIR = re.compile(r"ipykernel_[0-9]{1,10}")
_DEBUGGER_FILE = re.compile(r"[0-9]{1,20}\.py")


class CellFileError(ValueError):
    """A cell file name that is refused, or a required cell file that cannot be written."""


def cells_kept() -> int:
    """How many cell files stay: ``KT_CELLS_KEPT`` when it is a positive integer, else :data:`CELLS_KEPT`."""
    raw = os.environ.get("KT_CELLS_KEPT", "")
    return int(raw) if raw.isdigit() and 0 < int(raw) <= 1_000_000 else CELLS_KEPT


def free_space(path: Path) -> str:
    """Free bytes on the disk holding ``path`` (its nearest existing ancestor), for messages."""
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return _human(st.f_bavail * st.f_frsize)
    return "unknown space"


def _human(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"  # pragma: no cover - the loop always returns


def debugger_path(path: str) -> Path:
    """``path`` when it has the shape of JupyterLab's debugger cell files; else CellFileError."""
    if not isinstance(path, str) or "\0" in path or not os.path.isabs(path) or os.path.normpath(path) != path:
        raise CellFileError(f"refused cell file {path!r}: an absolute cell file path must be normalized "
                            "(no '..', no '//')")
    parent, name = os.path.split(path)
    top, folder = os.path.split(parent)
    if not (_DEBUGGER_FILE.fullmatch(name) and _DEBUGGER_DIR.fullmatch(folder)):
        raise CellFileError(f"refused cell file {path!r}: an absolute cell file path must look like "
                            "<tmp>/ipykernel_<pid>/<digits>.py (JupyterLab's debugger); other cells are "
                            "named relative to the cells directory")
    if not os.path.isdir(top):
        raise CellFileError(f"refused cell file {path!r}: {top} does not exist on the pod kernel's machine")
    return Path(path)


def write_cell_file(path: str, text: str) -> bool:
    """Create a debugger's cell file at ``path`` (see :func:`debugger_path`) unless it exists.

    The ``cell_file`` request: the notebook's debugger panel writes a cell this
    way before it sets breakpoints in it, when the cell has not run here yet.
    True when written, False when an existing file of ours was kept.
    """
    target = debugger_path(path)
    parent = target.parent
    try:
        os.mkdir(parent, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CellFileError(f"cannot create the cell file's directory {parent}: {exc.strerror or exc}") from None
    try:
        dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise CellFileError(f"refused cell file {path!r}: {parent} is not a directory (a symlink?)") from None
    try:
        if os.fstat(dir_fd).st_uid != os.getuid():
            raise CellFileError(f"refused cell file {path!r}: {parent} belongs to another user")
        try:
            fd = os.open(target.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
        except FileExistsError:
            st = os.stat(target.name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                return False
            raise CellFileError(f"refused cell file {path!r}: something other than a file of this user "
                                "is there (a symlink?)") from None
        except OSError as exc:
            raise CellFileError(f"cannot write the cell file {path}: {exc.strerror or exc} "
                                f"({free_space(parent)} free on that disk)") from None
        try:
            _write_all(fd, text)
        except OSError as exc:
            os.unlink(target.name, dir_fd=dir_fd)
            raise CellFileError(f"cannot write the cell file {path}: {exc.strerror or exc} "
                                f"({free_space(parent)} free on that disk)") from None
        return True
    finally:
        os.close(dir_fd)


def _write_all(fd: int, text: str) -> None:
    """Write ``text`` to ``fd`` and close it (also when the write fails)."""
    try:
        data = memoryview(text.encode("utf-8", "surrogatepass"))
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


class CellFiles:
    """The cells directory of one executor: names, writes and the bounded count of files."""

    def __init__(self, cells_dir: Path, kept: int | None = None) -> None:
        self.dir = Path(cells_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kept = kept or cells_kept()
        self._counter = 0
        existing = sorted((p for p in self.dir.glob("*.py") if p.is_file()), key=lambda p: p.stat().st_mtime)
        self._written: OrderedDict[str, None] = OrderedDict((p.name, None) for p in existing)
        #: files not written yet (no debugger listens), name -> source, newest last
        self._kept_in_memory: OrderedDict[str, str] = OrderedDict()
        #: whether a debugger listens: each cell's file is written before it runs
        self.eager = False
        self._lock = threading.Lock()  # the main thread writes cells, the thread that starts debugpy kept ones
        #: cell name -> its path, for the last names seen (a notebook sends the same few again and again)
        self._named: OrderedDict[str, Path] = OrderedDict()

    def path(self, cell_name: str | None, code: str) -> Path:
        """Where a cell's source goes: a debugger's absolute path as it is, else a file in the cells directory."""
        self._counter += 1
        if cell_name:
            known = self._named.get(cell_name)
            if known is None:
                known = self._named[cell_name] = self._named_path(cell_name)
                while len(self._named) > NAMES_KEPT:
                    self._named.popitem(last=False)
            return known
        digest = hashlib.sha1(code.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return self._in_dir(f"cell-{self._counter}-{digest}")

    def _named_path(self, cell_name: str) -> Path:
        if os.path.isabs(cell_name):
            return Path(cell_name)
        return self._in_dir(_SAFE_NAME.sub("_", os.path.basename(cell_name))[:NAME_MAX_CHARS] or "cell")

    def _in_dir(self, base: str) -> Path:
        if base in (".", ".."):
            base = "cell"
        if not base.endswith(".py"):
            base += ".py"
        return self.dir / base

    def write(self, path: Path, code: str, required: bool) -> str | None:
        """Write a cell's file, or keep it in memory until a debugger listens; None, or a warning saying the
        cell runs from memory (its file could not be written).

        A file is written at once when it is ``required`` (``--debug wait``: the IDE sets breakpoints in it
        first) or once a debugger listens (:meth:`write_kept`); before that no IDE can set a breakpoint, and
        tracebacks and pdb read IPython's line cache, so a file would cost each cell ~0.1 ms for nothing.
        A debugger's path (outside the cells directory) and a ``required`` file that cannot be written
        raise CellFileError instead.
        """
        if os.path.dirname(path) != str(self.dir):  # (Path.parent builds a new Path: 30 us a cell, cold)
            write_cell_file(str(path), code)  # kept when the notebook side wrote it already
            return None
        with self._lock:
            self._kept_in_memory.pop(path.name, None)
            if not (required or self.eager):
                self._kept_in_memory[path.name] = code
                while len(self._kept_in_memory) > self.kept:
                    self._kept_in_memory.popitem(last=False)
                return None
        why = self._write_now(path, code)
        if why is None:
            return None
        if required:
            raise CellFileError(f"{why}: a debugger needs it, so the cell did not run; "
                                "free some space and run it again")
        return f"[kt] {why}: the cell runs from memory, and breakpoints in it will not work\n"

    def write_kept(self) -> list[str]:
        """A debugger listens: write the files of the cells kept in memory, and from now on each cell's file
        before it runs. Returns why files could not be written (none when all were)."""
        with self._lock:
            self.eager = True
            kept, self._kept_in_memory = self._kept_in_memory, OrderedDict()
        failures = [self._write_now(self.dir / name, code) for name, code in kept.items()]
        return [why for why in failures if why is not None]

    def _write_now(self, path: Path, code: str) -> str | None:
        """Write a file of the cells directory, dropping the oldest beyond :attr:`kept`; why it failed, if."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, code)
            except OSError:
                with contextlib.suppress(OSError):
                    path.unlink()  # no half-written file for a debugger to open
                raise
        except OSError as exc:
            return (f"could not write this cell's file {path} ({exc.strerror or exc}; "
                    f"{free_space(path.parent)} free on that disk)")
        with self._lock:
            self._written[path.name] = None
            self._written.move_to_end(path.name)
            dropped = [self._written.popitem(last=False)[0] for _ in range(len(self._written) - self.kept)]
        for old in dropped:
            with contextlib.suppress(OSError):
                (self.dir / old).unlink()
        return None
