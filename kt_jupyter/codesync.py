"""The user's local code as the pod kernel should see it: a manifest of files and their hashes.

What is synced: the Python files of a root directory (the working directory
by default) and of the packages under it, plus any extra package
directories named, plus the *projects* of modules that seed-API code needs
from elsewhere (:meth:`CodeTree.provide`). A project is the directory that
holds a module's file and marks a project (a git root, or the nearest
``pyproject.toml`` / ``setup.py`` / ``setup.cfg``), as kubetorch and runhouse
sync "the working git repo"; of it, the import roots the modules were found
under are synced (their top-level files and packages), to
``_kt_projects/<id>/`` on the pod with a ``.pth`` that puts those roots on
``sys.path`` there (:mod:`pod_kernel.codesync`).

A file's hash is cached by (mtime, size), and the list of files by the
mtimes of the directories walked, so an unchanged tree costs one ``stat`` per
file and directory; on Linux, where the directories are on a local
filesystem, an inotify watch on each (:mod:`kt_jupyter.dirwatch`) says that
nothing changed for one ``read``. Nothing is sent when the manifest has not
changed since the last sync. The pod reloads the modules whose files changed.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pod_kernel.codesync import PROJECTS_DIR, content_hash

from .dirwatch import DirWatch
from .errors import KtError

#: Directories never synced.
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "build", "dist", "venv", "env"})
#: A tree bigger than this is not synced (it is not "the user's code").
MAX_FILES = 2000
MAX_FILE_BYTES = 2 << 20
#: What marks the root of a project, looked for from a module's file upwards.
PROJECT_MARKERS = (".git", "pyproject.toml", "setup.py", "setup.cfg")
#: Packages the pod kernel itself runs: always importable there.
POD_PACKAGES = frozenset({"pod_kernel"})

Placement = Literal["installed", "synced", "missing"]


@dataclass
class _Project:
    """A project outside the root: its directory and the import roots in it that are synced."""

    id: str
    root: Path
    import_roots: list[Path] = field(default_factory=list)

    def pth(self) -> str:
        """The ``.pth`` text: the import roots as directories under the pod's projects directory."""
        lines = []
        for r in self.import_roots:
            rel = r.relative_to(self.root).as_posix()
            lines.append(self.id if rel == "." else f"{self.id}/{rel}")
        return "\n".join(lines) + "\n"


def project_root(path: Path) -> Path | None:
    """The nearest directory at or above ``path`` that marks a project (git root, pyproject, setup.py)."""
    for directory in [path, *path.parents]:
        if any((directory / marker).exists() for marker in PROJECT_MARKERS):
            return directory
    return None


def import_root(file: str, module: str) -> Path | None:
    """The ``sys.path`` directory ``module`` was imported from, given its file; None if they disagree."""
    path = Path(os.path.abspath(file))
    parts = module.split(".")
    directory = path.parent
    names = parts if path.stem == "__init__" else parts[:-1]
    if path.stem != "__init__" and path.stem != parts[-1]:
        return None
    for name in reversed(names):
        if directory.name != name:
            return None
        directory = directory.parent
    return directory.resolve()


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _installed_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("purelib", "platlib", "stdlib", "platstdlib") if paths.get(k)}
    dirs.update(p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages"))
    return tuple(str(Path(d).resolve()) + os.sep for d in dirs)


class CodeTree:
    """Python files under ``root`` (and extra packages and projects), hashed incrementally."""

    def __init__(self, root: str | os.PathLike | None = None, packages: Iterable[str | os.PathLike] = ()) -> None:
        self.root = Path(root or os.getcwd()).resolve()
        self.packages = [Path(p).resolve() for p in packages]
        self.projects: dict[str, _Project] = {}
        self._cache: dict[str, tuple[int, int, str]] = {}
        self._placed: dict[str, Placement] = {}
        self._installed = _installed_dirs()
        self.last_sent: dict[str, str] | None = None
        self._listed: frozenset[str] = frozenset()
        #: (packages and projects, directory -> mtime_ns, listing) of the last walk
        self._walked: tuple[Any, dict[str, int], list[tuple[str, list[tuple[str, str]]]]] | None = None
        #: the directories walked, watched (Linux): while nothing changes there, the last manifest holds
        self._watch = DirWatch()
        self._manifest: dict[str, str] | None = None

    # ------------------------------------------------------------------ what the pod needs

    def provide(self, module: str) -> Placement:
        """Make ``module`` importable by name on the pod: ``"installed"`` (stdlib, site-packages, built in:
        the pod imports its own copy), ``"synced"`` (under the root, or its project is synced from now
        on), ``"missing"`` (no source file to send, e.g. made at run time)."""
        if module in self._placed:
            return self._placed[module]
        placed = self._place(module)
        self._placed[module] = placed
        return placed

    def _place(self, module: str) -> Placement:
        top = module.partition(".")[0]
        if top in POD_PACKAGES or top in sys.builtin_module_names or module in sys.builtin_module_names:
            return "installed"
        mod = sys.modules.get(module)
        file = getattr(mod, "__file__", None)
        if not file:
            spec = getattr(mod, "__spec__", None)
            return "installed" if spec is not None and spec.origin in ("built-in", "frozen") else "missing"
        real = str(Path(file).resolve())
        if real.startswith(self._installed):
            return "installed"
        root = import_root(file, module)
        if root is None:
            return "missing"
        if root == self.root:
            return "synced"
        self.add_import_root(root)
        return "synced"

    def add_import_root(self, directory: Path) -> _Project:
        """Sync ``directory`` (a ``sys.path`` entry outside the root) as part of the project that holds it."""
        directory = directory.resolve()
        proot = project_root(directory) or directory
        key = str(proot)
        project = self.projects.get(key)
        if project is None:
            slug = re.sub(r"[^A-Za-z0-9_.-]", "_", proot.name or "root")
            project = _Project(f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}", proot)
            self.projects[key] = project
        if directory not in project.import_roots:
            project.import_roots.append(directory)
            self._manifest = None
        return project

    # ------------------------------------------------------------------ the manifest

    def _walk(self, base: str, directory: str, top: bool, dirs: dict[str, int]) -> Iterable[tuple[str, str]]:
        # plain strings and DirEntry: a full walk costs microseconds per file. ``dirs`` gets the mtime of every
        # directory looked into: while none changes, no file or package came or went (see :meth:`_listing`)
        try:
            dirs[directory] = os.stat(directory).st_mtime_ns
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            dirs[directory] = -1
            return
        is_package = any(e.name == "__init__.py" for e in entries)
        cut = len(base.rstrip(os.sep)) + 1
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if name.endswith(".py") and entry.is_file():
                if top or is_package or directory != base:
                    yield entry.path[cut:].replace(os.sep, "/"), entry.path
            elif entry.is_dir() and name not in SKIP_DIRS:
                if os.path.exists(os.path.join(entry.path, "__init__.py")):
                    yield from self._walk(base, entry.path, top=False, dirs=dirs)
                else:  # not a package now: one if an __init__.py appears in it (its mtime changes)
                    try:
                        dirs[entry.path] = os.stat(entry.path).st_mtime_ns
                    except OSError:
                        dirs[entry.path] = -1

    def _hashed(self, files: Iterable[tuple[str, str]], out: dict[str, str], prefix: str = "") -> None:
        """Add ``prefix + rel -> hash`` of ``files`` (relative path, path) to ``out``."""
        for rel, path in files:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_size > MAX_FILE_BYTES:
                continue
            key = prefix + rel
            cached = self._cache.get(key)
            if cached and cached[0] == st.st_mtime_ns and cached[1] == st.st_size:
                out[key] = cached[2]
                continue
            try:
                with open(path, "rb") as f:
                    digest = content_hash(f.read())
            except OSError:
                continue
            self._cache[key] = (st.st_mtime_ns, st.st_size, digest)
            out[key] = digest

    def _listing(self) -> list[tuple[str, list[tuple[str, str]]]]:
        """(prefix, files) of the working directory, extra packages and projects, walked again only when a
        directory looked into changed (a file or package added, removed or renamed) or the projects did: an
        unchanged tree costs one ``stat`` per directory and file before every cell, not a walk."""
        shape = (tuple(self.packages), tuple((p.id, tuple(p.import_roots)) for p in self.projects.values()))
        if self._walked is not None and self._walked[0] == shape and all(
                _mtime_ns(d) == m for d, m in self._walked[1].items()):
            return self._walked[2]
        dirs: dict[str, int] = {}
        root = str(self.root)

        def main_files() -> Iterable[tuple[str, str]]:
            yield from self._walk(root, root, top=True, dirs=dirs)
            for pkg in self.packages:
                yield from self._walk(str(pkg.parent), str(pkg), top=False, dirs=dirs)

        listing = [("", list(itertools.islice(main_files(), MAX_FILES)))]  # its first MAX_FILES files, as always
        for project in self.projects.values():
            base = str(project.root)
            files = (f for r in project.import_roots for f in self._walk(base, str(r), top=True, dirs=dirs))
            found = list(itertools.islice(files, MAX_FILES + 1))
            if len(found) > MAX_FILES:
                raise KtError(f"the project at {project.root} has more than {MAX_FILES} Python files, too many to "
                              "sync to the pod kernel; install it in the compute's image instead (then it is "
                              "imported there by name)")
            listing.append((f"{PROJECTS_DIR}/{project.id}/", found))
        self._walked = (shape, dirs, listing)
        return listing

    def manifest(self) -> dict[str, str]:
        """Relative path on the pod -> content hash of every file to sync (the last one's very dict, when the
        directory watch vouches that nothing changed since)."""
        changed = self._watch.changed()  # events until now are read: a walk now covers them, later ones queue
        if self._manifest is not None and not changed:
            return self._manifest
        out: dict[str, str] = {}
        for prefix, files in self._listing():
            self._hashed(files, out, prefix)
        for project in self.projects.values():
            out[f"{PROJECTS_DIR}/{project.id}.pth"] = content_hash(project.pth().encode())
        self._listed = frozenset(out)
        assert self._walked is not None
        # a directory watched only from now on may have changed since it was walked: the next call walks again
        fresh = self._watch.watch(self._walked[1])
        self._manifest = out if self._watch.usable and not fresh else None
        return out

    def close(self) -> None:
        """Stop watching the tree (its compute is disconnected)."""
        self._watch.close()
        self._manifest = None

    def read(self, rel: str) -> str:
        """The text of a file of the last manifest (the pod names it: nothing else is read)."""
        if rel not in self._listed:
            raise FileNotFoundError(f"{rel!r} is not in the code manifest")
        if rel.startswith(PROJECTS_DIR + "/"):
            name, _, inner = rel[len(PROJECTS_DIR) + 1:].partition("/")
            for project in self.projects.values():
                if not inner and name == f"{project.id}.pth":
                    return project.pth()
                if name == project.id and inner:
                    return (project.root / inner).read_text()
            raise FileNotFoundError(rel)
        for base in [self.root] + [p.parent for p in self.packages]:
            path = base / rel
            if path.is_file():
                return path.read_text()
        raise FileNotFoundError(rel)
