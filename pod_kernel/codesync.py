"""The user's code on the pod kernel: files synced by content hash, changed modules reloaded.

The notebook side sends a manifest (relative path -> content hash); the pod
answers which files it lacks or holds in another version; the notebook sends
only those. Written files land under :attr:`CodeSync.root`, first on
``sys.path``; every module loaded from a changed file is reloaded, so the
next cell or call runs the new code in the warm kernel.

Code from outside the notebook's working directory (the project a
function's module lives in) lands under ``_kt_projects/<id>/``; the
project's ``_kt_projects/<id>.pth`` lists, one per line, the directories
under ``_kt_projects/`` to put on ``sys.path`` (its import roots, as a
``.pth`` file in site-packages does).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path, PurePosixPath

#: Where projects outside the working directory are synced, under the code root.
PROJECTS_DIR = "_kt_projects"


def content_hash(data: bytes) -> str:
    """The hash both sides use for file contents."""
    try:
        import xxhash

        return "xxh3:" + xxhash.xxh3_128_hexdigest(data)
    except ImportError:
        import hashlib

        return "b2:" + hashlib.blake2b(data, digest_size=16).hexdigest()


class CodeSync:
    """Synced source files under ``root`` and the modules loaded from them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.hashes: dict[str, str] = {}
        #: one sync at a time: sessions of two notebooks may send the same files at once (their writes and
        #: reloads must not interleave, nor share a temporary file)
        self._lock = threading.Lock()
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))
        sys.dont_write_bytecode = True  # a same-second, same-size edit must never hit a stale .pyc

    def _path(self, rel: str) -> Path:
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or not rel:
            raise ValueError(f"refusing to write outside the code directory: {rel!r}")
        return self.root.joinpath(*p.parts)

    def need(self, manifest: dict[str, str]) -> list[str]:
        """Paths of the manifest whose content differs from what is here."""
        out = []
        for rel, digest in manifest.items():
            if self.hashes.get(rel) != digest:
                path = self._path(rel)
                if path.is_file() and content_hash(path.read_bytes()) == digest:
                    self.hashes[rel] = digest
                    self._add_paths(rel)
                    continue
                out.append(rel)
        return out

    def _add_paths(self, rel: str) -> None:
        """Put the directories a project's ``.pth`` names on ``sys.path`` (after the code root)."""
        p = PurePosixPath(rel)
        if len(p.parts) != 2 or p.parts[0] != PROJECTS_DIR or p.suffix != ".pth":
            return
        for line in self._path(rel).read_text().splitlines():
            if not line.strip():
                continue
            entry = str(self._path(f"{PROJECTS_DIR}/{line.strip()}"))
            if entry not in sys.path:
                at = sys.path.index(str(self.root)) + 1 if str(self.root) in sys.path else len(sys.path)
                sys.path.insert(at, entry)

    def apply(self, files: dict[str, str]) -> list[str]:
        """Write files, then reload the modules loaded from them; returns the reloaded module names."""
        with self._lock:
            return self._apply(files)

    def _apply(self, files: dict[str, str]) -> list[str]:
        changed: set[str] = set()
        for rel, text in files.items():
            path = self._path(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            data = text.encode()
            tmp = path.with_name(path.name + ".kt-tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self.hashes[rel] = content_hash(data)
            changed.add(str(path))
        for rel in files:
            self._add_paths(rel)
        importlib.invalidate_caches()
        reloaded = []
        for name, module in sorted(sys.modules.copy().items()):
            file = getattr(module, "__file__", None)
            if file and str(Path(file).resolve()) in changed:
                importlib.reload(module)
                reloaded.append(name)
        return reloaded
