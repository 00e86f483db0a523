"""The local backend's registry on disk, trusted only where it is this user's own.

``$KT_HOME/local/<name>/`` holds one compute's ``kernel.json``, ``token`` and
``kernel.log``. Every path built from a compute name comes from
:func:`entry_path`: the name passes :func:`~kt_jupyter.names.check_compute_name`
and the resolved path must be a direct child of the registry root, so no name
reaches outside it. Trust is checked before anything is read, connected to
or deleted:

- the root and each entry are real directories (not symlinks), owned by this
  user, with no permission bits for group or others (0700);
- ``kernel.json`` and ``token`` are opened with ``O_NOFOLLOW`` and must be
  regular files owned by this user, mode 0600 or stricter; ``kernel.log`` is
  opened the same way;
- files are written 0600 (``kernel.json`` through a 0600 temporary file).

Anything else is refused with an error that says what is wrong and what to
do (a root that is not private: :class:`BackendUnavailable`; an entry or file
that is not ours: :class:`NotFoundError`, as it is no compute of ours). An
entry that is not ours is never deleted either; our own entry holding files
we do not trust may be (that reads nothing from them).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from ..errors import BackendUnavailable, NotFoundError
from ..names import check_compute_name

#: Permission bits the registry's directories and secret files must not have (group and others).
SHARED_BITS = 0o077
#: Largest ``kernel.json`` or ``token`` read back, in bytes.
MAX_REGISTRY_FILE_BYTES = 1 << 20

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def checked_root(root: Path) -> Path:
    """The registry root, created 0700 when missing; BackendUnavailable when it is not private to this user."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise BackendUnavailable(
            f"the local compute registry {root} is {what}; kt_jupyter only trusts a directory of yours there: "
            f"remove it and run `mkdir -m 700 {root}` (or set KT_HOME to a directory of yours)")
    if st.st_uid != os.geteuid():
        raise BackendUnavailable(
            f"the local compute registry {root} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}); "
            "kt_jupyter does not trust it: remove it, or set KT_HOME to a directory of yours")
    if st.st_mode & SHARED_BITS:
        raise BackendUnavailable(
            f"the local compute registry {root} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"kt_jupyter does not trust it: run `chmod 700 {root}`")
    return root


def _untrusted(name: str, path: Path, why: str, *, entry: bool) -> NotFoundError:
    fix = ("if you did not make it, look at it and remove it yourself" if entry
           else f"`%kt down {name}` removes the entry (and reads nothing from it)")
    return NotFoundError(f"local compute {name!r} is not usable: {path} {why}; kt_jupyter does not trust it: {fix}")


def entry_path(root: Path, name: str) -> Path:
    """The registry directory of compute ``name``: a checked name, a path that stays inside ``root``."""
    path = root / check_compute_name(name)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(root):
        raise _untrusted(name, path, "leads outside the registry (a symbolic link)", entry=True)
    return path


def lock_path(root: Path, name: str) -> Path:
    """The lock file that serialises launch and delete of compute ``name``."""
    return root / f".{check_compute_name(name)}.lock"


def open_lock(path: Path) -> int:
    """A descriptor on the lock file at ``path``: created 0600, never truncated, never through a symlink."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _check_owner(name: str, path: Path, st: os.stat_result, *, private: bool, entry: bool) -> None:
    if st.st_uid != os.geteuid():
        raise _untrusted(name, path, f"is not yours (owned by uid {st.st_uid}; you are uid {os.geteuid()})",
                         entry=entry)
    if private and st.st_mode & SHARED_BITS:
        raise _untrusted(name, path, f"is open to other users (mode {stat.S_IMODE(st.st_mode):04o})", entry=entry)


def trusted_entry(root: Path, name: str) -> Path | None:
    """The entry directory of ``name`` if there is one and it is ours and private; None if there is none."""
    path = entry_path(root, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise _untrusted(name, path, "is a symbolic link" if stat.S_ISLNK(st.st_mode) else "is not a directory",
                         entry=True)
    _check_owner(name, path, st, private=True, entry=True)
    return path


def open_file(name: str, path: Path, *, private: bool) -> int | None:
    """A read descriptor on a registry file (None if missing), refused unless a regular file of ours.

    ``private`` files (``kernel.json``, ``token``) must also have no group or other bits.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _untrusted(name, path, "is a symbolic link", entry=False) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _untrusted(name, path, "is not a regular file", entry=False)
        _check_owner(name, path, st, private=private, entry=False)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(name: str, path: Path) -> bytes | None:
    """The bytes of a private registry file (at most :data:`MAX_REGISTRY_FILE_BYTES`), None if missing."""
    fd = open_file(name, path, private=True)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_REGISTRY_FILE_BYTES)


def write_private(path: Path, data: bytes) -> None:
    """Replace the file at ``path`` by ``data``, written 0600 through a temporary file beside it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def create_private(path: Path, *, append: bool = False) -> int:
    """A write descriptor on a new 0600 file (``append``: an existing one is appended to), never via a symlink."""
    mode = os.O_APPEND if append else os.O_EXCL
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | mode, 0o600)


def fresh_entry(root: Path, name: str) -> Path:
    """An empty 0700 entry for ``name``, replacing an old one of ours (an untrusted one is refused)."""
    path = remove_entry(root, name) or entry_path(root, name)
    path.mkdir(mode=0o700)
    return path


def remove_entry(root: Path, name: str) -> Path | None:
    """Delete the entry of ``name`` if there is one (only ours: it is checked first); its path, or None."""
    path = trusted_entry(root, name)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)  # rmtree never follows symlinks inside it
    return path


def entry_names(root: Path) -> list[str]:
    """Names of the registry's entries that are ours, sorted; anything else there is left alone."""
    names = []
    with os.scandir(root) as it:
        for item in it:
            try:
                if trusted_entry(root, item.name) is not None:
                    names.append(item.name)
            except (NotFoundError, ValueError):  # not a name (ValueError), not ours, a symlink: not a compute
                continue
    return sorted(names)
