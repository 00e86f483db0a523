"""The user's local code as the pod kernel should see it: a manifest of files and their hashes.

What is synced: the Python files of a root directory (the working directory
by default) and of the packages under it, plus any extra package
directories named. A file's hash is cached by (mtime, size), so an unchanged
tree costs one ``stat`` per file; nothing is sent when the manifest has not
changed since the last sync. The pod reloads the modules whose files
changed (:mod:`pod_kernel.codesync`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from pod_kernel.codesync import content_hash

#: Directories never synced.
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "build", "dist", "venv", "env"})
#: A tree bigger than this is not synced (it is not "the user's code").
MAX_FILES = 2000
MAX_FILE_BYTES = 2 << 20


class CodeTree:
    """Python files under ``root`` (and extra packages), hashed incrementally."""

    def __init__(self, root: str | os.PathLike | None = None, packages: Iterable[str | os.PathLike] = ()) -> None:
        self.root = Path(root or os.getcwd()).resolve()
        self.packages = [Path(p).resolve() for p in packages]
        self._cache: dict[str, tuple[int, int, str]] = {}
        self.last_sent: dict[str, str] | None = None

    def _files(self) -> Iterable[tuple[str, Path]]:
        yield from self._walk(self.root, self.root, top=True)
        for pkg in self.packages:
            yield from self._walk(pkg.parent, pkg, top=False)

    def _walk(self, base: Path, directory: Path, top: bool) -> Iterable[tuple[str, Path]]:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        is_package = (directory / "__init__.py").exists()
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.name.endswith(".py") and (top or is_package or directory != base):
                yield Path(entry.path).relative_to(base).as_posix(), Path(entry.path)
            elif entry.is_dir() and entry.name not in SKIP_DIRS and (Path(entry.path) / "__init__.py").exists():
                yield from self._walk(base, Path(entry.path), top=False)

    def manifest(self) -> dict[str, str]:
        """Relative path -> content hash of every file to sync."""
        out: dict[str, str] = {}
        for rel, path in self._files():
            if len(out) >= MAX_FILES:
                break
            try:
                st = path.stat()
            except OSError:
                continue
            if st.st_size > MAX_FILE_BYTES:
                continue
            cached = self._cache.get(rel)
            if cached and cached[0] == st.st_mtime_ns and cached[1] == st.st_size:
                out[rel] = cached[2]
                continue
            digest = content_hash(path.read_bytes())
            self._cache[rel] = (st.st_mtime_ns, st.st_size, digest)
            out[rel] = digest
        return out

    def read(self, rel: str) -> str:
        """The text of a manifest file."""
        for base in [self.root] + [p.parent for p in self.packages]:
            path = base / rel
            if path.is_file():
                return path.read_text()
        raise FileNotFoundError(rel)
