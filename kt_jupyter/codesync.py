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

    def _files(self) -> Iterable[tuple[str, os.DirEntry]]:
        root = str(self.root)
        yield from self._walk(root, root, top=True)
        for pkg in self.packages:
            yield from self._walk(str(pkg.parent), str(pkg), top=False)

    def _walk(self, base: str, directory: str, top: bool) -> Iterable[tuple[str, os.DirEntry]]:
        # plain strings and DirEntry: this runs before every %%kt cell, so it must cost microseconds per file
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        is_package = any(e.name == "__init__.py" for e in entries)
        cut = len(base.rstrip(os.sep)) + 1
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if name.endswith(".py") and entry.is_file():
                if top or is_package or directory != base:
                    yield entry.path[cut:].replace(os.sep, "/"), entry
            elif entry.is_dir() and name not in SKIP_DIRS and os.path.exists(os.path.join(entry.path, "__init__.py")):
                yield from self._walk(base, entry.path, top=False)

    def manifest(self) -> dict[str, str]:
        """Relative path -> content hash of every file to sync."""
        out: dict[str, str] = {}
        for rel, entry in self._files():
            if len(out) >= MAX_FILES:
                break
            try:
                st = entry.stat()
            except OSError:
                continue
            if st.st_size > MAX_FILE_BYTES:
                continue
            cached = self._cache.get(rel)
            if cached and cached[0] == st.st_mtime_ns and cached[1] == st.st_size:
                out[rel] = cached[2]
                continue
            try:
                with open(entry.path, "rb") as f:
                    digest = content_hash(f.read())
            except OSError:
                continue
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
