"""The pod's side of ``Compute.rsync``: which files differ, writing them in pieces, deleting extras.

Called as seed-API calls by module name (``{"kind": "module", "module":
"pod_kernel.rsync", ...}``), so JSON-only kernels serve them too (file data
then arrives base64-encoded). Every path the notebook names is checked by
:func:`target` and :func:`_file`: relative, no ``..``, under the destination,
never through a symlink we did not write. A file is written to a
``.kt-rsync-part`` beside it and renamed into place when its last piece
arrives, so a reader never sees half a file and an interrupted sync leaves
the old one.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Any

#: Suffix of a file being received.
PART_SUFFIX = ".kt-rsync-part"
#: Bytes read at once while hashing.
HASH_READ_BYTES = 1 << 20

_hashes: dict[str, tuple[int, int, str]] = {}


def file_hash(path: str | os.PathLike) -> str:
    """The content hash both sides compare (blake2b-128, read in pieces: data files may be large)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def cached_hash(path: str, cache: dict[str, tuple[int, int, str]]) -> tuple[int, str]:
    """(size, hash) of a file, hashed again only when its mtime or size changed."""
    st = os.stat(path)
    hit = cache.get(path)
    if hit and hit[0] == st.st_mtime_ns and hit[1] == st.st_size:
        return st.st_size, hit[2]
    digest = file_hash(path)
    cache[path] = (st.st_mtime_ns, st.st_size, digest)
    return st.st_size, digest


def _relative(rel: object, what: str) -> PurePosixPath:
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise ValueError(f"rsync: {what} must be a non-empty path string; got {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.endswith(PART_SUFFIX):
        raise ValueError(f"rsync: {what} {rel!r} must be relative, without '..'")
    return p


def target(dest: object) -> Path:
    """The destination directory: the working directory, or ``dest`` under it (or absolute)."""
    if dest is None or dest == "":
        return Path(os.getcwd())
    if isinstance(dest, str) and dest.startswith("/"):
        if "\0" in dest or ".." in PurePosixPath(dest).parts:
            raise ValueError(f"rsync: dest {dest!r} must not contain '..'")
        return Path(dest)
    return Path(os.getcwd()).joinpath(*_relative(dest, "dest").parts)


def _file(root: Path, rel: object) -> Path:
    path = root.joinpath(*_relative(rel, "file path").parts)
    for parent in [p for p in path.parents if len(p.parts) > len(root.parts)]:
        if parent.is_symlink():
            raise ValueError(f"rsync: {parent} is a symlink; refusing to write through it")
    return path


def need(dest: str | None, manifest: dict[str, list]) -> dict[str, Any]:
    """The files of ``manifest`` (path -> [size, hash]) that differ here; and where ``dest`` is."""
    root = target(dest)
    out = []
    for rel, entry in manifest.items():
        path = _file(root, rel)
        size, digest = entry
        try:
            if not path.is_symlink() and path.is_file() and cached_hash(str(path), _hashes) == (size, digest):
                continue
        except OSError:
            pass
        out.append(rel)
    return {"root": str(root), "need": out}


def write(dest: str | None, pieces: list[list]) -> int:
    """Write pieces ``[path, offset, total size, mode, data]`` (data: bytes, or base64 text from JSON-only
    kernels); a file whose last piece arrived replaces the old one. Returns the bytes written."""
    root = target(dest)
    written = 0
    for rel, offset, total, mode, data in pieces:
        path = _file(root, rel)
        raw = base64.b64decode(data) if isinstance(data, str) else bytes(data)
        if not (isinstance(offset, int) and isinstance(total, int) and 0 <= offset and offset + len(raw) <= total):
            raise ValueError(f"rsync: piece of {rel!r} at {offset!r} does not fit its size {total!r}")
        part = path.with_name(path.name + PART_SUFFIX)
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | (os.O_TRUNC if offset == 0 else 0)
        fd = os.open(part, flags, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.seek(offset)
            f.write(raw)
        written += len(raw)
        if offset + len(raw) == total:
            os.chmod(part, int(mode) & 0o777)
            os.replace(part, path)
    return written


def remove_extra(dest: str | None, tops: list[str], keep: list[str]) -> list[str]:
    """Delete files under ``dest/<top>`` (each synced top; ``"."``: all of dest) that are not in ``keep``."""
    root = target(dest)
    kept = {str(_relative(k, "file path")) for k in keep}
    removed = []
    for top in tops:
        base = root if top == "." else _file(root, top)
        if base.is_symlink() or not base.is_dir():
            continue
        for directory, dirs, files in os.walk(base):  # os.walk does not follow symlinked directories
            for name in files + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
                full = Path(directory, name)
                rel = full.relative_to(root).as_posix()
                if rel not in kept:
                    full.unlink()
                    removed.append(rel)
    return sorted(removed)
