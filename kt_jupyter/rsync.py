"""``Compute.rsync(paths, dest)``: files from here to the pod's working directory, sending only what changed.

As rsync does: ``"src"`` lands as ``<dest>/src/...``, ``"src/"`` (or
``contents=True``) puts what is in ``src`` into ``dest``; a file lands as
``<dest>/<name>``. Each run lists the local files with their size and hash
(a hash is computed again only when mtime or size changed), asks the pod
which differ (:func:`pod_kernel.rsync.need`), and sends only those, in
pieces of :data:`PIECE_BYTES`, with progress. Files deleted here stay on the
pod, as with plain ``rsync``; ``delete=True`` removes them there too
(``rsync --delete``, only under the synced directories). Symlinked files are
sent as their content; symlinked directories are not entered.

The transfer uses seed-API calls on the pod kernel's own connection: bytes
travel pickled when the compute allows pickle, else base64 in JSON.
"""

from __future__ import annotations

import base64
import fnmatch
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pod_kernel.rsync import cached_hash

from .errors import KtError

#: Bytes of file data per call to the pod.
PIECE_BYTES = 4 << 20
_MODULE = "pod_kernel.rsync"

#: (sent bytes, total bytes to send, files done, files to send)
ProgressCallback = Callable[[int, int, int, int], None]

_hashes: dict[str, tuple[int, int, str]] = {}


@dataclass
class RsyncResult:
    """What one rsync did."""

    dest: str
    sent: list[str] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)
    bytes_sent: int = 0


@dataclass
class _Local:
    path: str
    size: int
    digest: str
    mode: int


def _walk(base: Path, prefix: str, exclude: tuple[str, ...]) -> Iterator[tuple[str, Path]]:
    for directory, dirs, files in os.walk(base):
        rel_dir = Path(directory).relative_to(base).as_posix()
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(directory, d))
                         and not _excluded(d, exclude))
        for name in sorted(files):
            if _excluded(name, exclude):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            yield (f"{prefix}/{rel}" if prefix else rel), Path(directory, name)


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in exclude)


def local_files(paths: Iterable[str | os.PathLike], contents: bool = False,
                exclude: Iterable[str] = ()) -> tuple[dict[str, _Local], list[str]]:
    """Path on the pod (relative to dest) -> the local file; and the tops that ``delete`` may clean."""
    patterns = tuple(exclude)
    files: dict[str, _Local] = {}
    tops: list[str] = []
    for raw in paths:
        text = os.fspath(raw)
        path = Path(text).expanduser()
        if not path.exists():
            raise KtError(f"rsync: {text!r} does not exist here (relative paths start at {os.getcwd()})")
        if path.is_dir():
            into = contents or text.endswith(("/", os.sep))
            prefix = "" if into else path.resolve().name
            tops.append(prefix or ".")
            found: Iterable[tuple[str, Path]] = _walk(path, prefix, patterns)
        else:
            found = [(path.name, path)]
        for rel, full in found:
            if not full.is_file():
                continue  # sockets, fifos, dangling links
            size, digest = cached_hash(str(full), _hashes)
            files[rel] = _Local(str(full), size, digest, full.stat().st_mode & 0o777)
    return files, tops


def print_progress(sent: int, total: int, done: int, count: int) -> None:
    """The default progress: one line on stderr, rewritten in place."""
    end = "\n" if done == count else ""
    sys.stderr.write(f"\rrsync: {done}/{count} files, {sent / 1e6:.1f}/{total / 1e6:.1f} MB{end}")
    sys.stderr.flush()


def rsync(session: Any, paths: str | os.PathLike | Iterable[str | os.PathLike], dest: str | None = None, *,
          pickle_ok: bool = True, contents: bool = False, delete: bool = False, exclude: Iterable[str] = (),
          progress: bool | ProgressCallback = True) -> RsyncResult:
    """Sync ``paths`` to ``dest`` on the pod kernel of ``session`` (see the module docstring)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files, tops = local_files(paths, contents, exclude)
    on_progress = print_progress if progress is True else (progress or None)
    ser = "pickle" if pickle_ok else "json"

    def call(fn: str, *args: Any) -> Any:
        return session.call({"kind": "module", "module": _MODULE, "qualname": fn}, list(args), serialization=ser)

    answer = call("need", dest, {rel: [f.size, f.digest] for rel, f in files.items()})
    result = RsyncResult(dest=answer["root"], unchanged=len(files) - len(answer["need"]))
    wanted = [files[rel] for rel in answer["need"] if rel in files]
    total = sum(f.size for f in wanted)
    pieces: list[list[Any]] = []
    batch_bytes = done = 0

    def flush() -> None:
        nonlocal pieces, batch_bytes
        if pieces:
            result.bytes_sent += call("write", dest, pieces)
            pieces, batch_bytes = [], 0
            if on_progress:
                on_progress(result.bytes_sent, total, done, len(wanted))

    for rel, local in zip(answer["need"], wanted):
        with open(local.path, "rb") as f:
            offset = 0
            while True:
                want = min(PIECE_BYTES - batch_bytes, local.size - offset)
                data = f.read(want)
                if len(data) < want:
                    raise KtError(f"rsync: {local.path} shrank while it was being sent; run rsync again")
                pieces.append([rel, offset, local.size, local.mode,
                               data if pickle_ok else base64.b64encode(data).decode()])
                batch_bytes += len(data)
                offset += len(data)
                if offset >= local.size:
                    break
                flush()
        done += 1
        result.sent.append(rel)
        if batch_bytes >= PIECE_BYTES:
            flush()
    flush()
    if not wanted and on_progress:
        on_progress(0, 0, 0, 0)
    if delete:
        result.deleted = call("remove_extra", dest, tops, list(files))
    return result
