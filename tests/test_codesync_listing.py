"""The code manifest is not walked again while no directory changed, yet every change is seen (codesync.py)."""

from __future__ import annotations

import os
import sys

import pytest

from kt_jupyter.codesync import CodeTree


def test_manifest_sees_new_removed_edited_files_and_new_packages_without_rewalking(tmp_path):
    (tmp_path / "a.py").write_text("A = 1\n")
    (tmp_path / "notpkg").mkdir()
    (tmp_path / "notpkg" / "m.py").write_text("M = 1\n")
    tree = CodeTree(tmp_path)
    first = tree.manifest()
    assert set(first) == {"a.py"}
    listing = tree._walked
    assert tree.manifest() == first and tree._walked is listing  # nothing changed: no new walk

    (tmp_path / "a.py").write_text("A = 22\n")  # edited in place: same listing, new hash
    edited = tree.manifest()
    assert tree._walked is listing and edited["a.py"] != first["a.py"]

    (tmp_path / "b.py").write_text("B = 1\n")
    assert set(tree.manifest()) == {"a.py", "b.py"}
    (tmp_path / "notpkg" / "__init__.py").write_text("")  # a directory becomes a package
    assert set(tree.manifest()) == {"a.py", "b.py", "notpkg/__init__.py", "notpkg/m.py"}
    (tmp_path / "notpkg" / "sub").mkdir()
    (tmp_path / "notpkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "notpkg" / "sub" / "deep.py").write_text("")
    assert "notpkg/sub/deep.py" in tree.manifest()
    os.remove(tmp_path / "b.py")
    assert "b.py" not in tree.manifest()


def _count_stats(monkeypatch) -> list[str]:
    import kt_jupyter.codesync as codesync

    calls: list[str] = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        calls.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(codesync.os, "stat", counting_stat)
    return calls


def test_watched_tree_is_vouched_for_without_a_stat_and_every_change_is_seen(tmp_path, monkeypatch):
    """Linux inotify (dirwatch.py): an unchanged tree costs no stat; edits, new files and packages, removals,
    a directory removed and made again are all seen by the very next manifest."""
    from kt_jupyter.dirwatch import LOCAL_FILESYSTEMS, _mounts, filesystem_type

    kind = filesystem_type(os.path.realpath(tmp_path), _mounts())
    if kind not in LOCAL_FILESYSTEMS or not sys.platform.startswith("linux"):
        pytest.skip(f"inotify vouches only for local Linux filesystems; {tmp_path} is on {kind}")
    (tmp_path / "a.py").write_text("A = 1\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    tree = CodeTree(tmp_path)
    first = tree.manifest()
    tree.manifest()  # the directories are watched from the first walk on; the second walk covers that gap
    assert tree._watch.usable
    stats = _count_stats(monkeypatch)
    assert tree.manifest() is tree.manifest() and stats == []

    (tmp_path / "notes.txt").write_text("not code")  # e.g. the notebook's autosave: no walk
    (tmp_path / "run.log").write_text("x" * 100)
    assert tree.manifest() is tree.manifest() and stats == []

    (tmp_path / "a.py").write_text("A = 2\n")
    edited = tree.manifest()
    assert edited["a.py"] != first["a.py"] and stats
    (tmp_path / "pkg" / "b.py").write_text("B = 1\n")
    assert "pkg/b.py" in tree.manifest()
    (tmp_path / "pkg" / "sub").mkdir()
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "c.py").write_text("C = 1\n")
    assert "pkg/sub/c.py" in tree.manifest()
    tree.manifest()
    (tmp_path / "pkg" / "sub" / "c.py").write_text("C = 2\n")  # in a directory watched since the walk above
    changed = tree.manifest()
    (tmp_path / "pkg" / "sub" / "c.py").unlink()
    (tmp_path / "pkg" / "sub" / "__init__.py").unlink()
    (tmp_path / "pkg" / "sub").rmdir()
    assert "pkg/sub/c.py" not in tree.manifest() and changed["pkg/sub/c.py"]
    (tmp_path / "pkg" / "sub").mkdir()
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "c.py").write_text("C = 3\n")
    again = tree.manifest()
    assert again["pkg/sub/c.py"] != changed["pkg/sub/c.py"]
    os.rename(tmp_path / "a.py", tmp_path / "renamed.py")
    assert {"renamed.py", "pkg/sub/c.py"} <= set(tree.manifest()) and "a.py" not in tree.manifest()
    stats.clear()
    tree.manifest()
    assert tree.manifest() is tree.manifest() and stats == []


def test_without_a_local_filesystem_or_inotify_every_manifest_checks_each_file(tmp_path, monkeypatch):
    """NFS, SMB, FUSE do not report other machines' edits; macOS has no inotify: the stat walk, every time."""
    import kt_jupyter.dirwatch as dirwatch

    (tmp_path / "a.py").write_text("A = 1\n")
    monkeypatch.setattr(dirwatch, "_mounts", lambda: [("/", "nfs4")])
    on_nfs = CodeTree(tmp_path)
    on_nfs.manifest()
    assert not on_nfs._watch.usable
    monkeypatch.undo()
    monkeypatch.setattr(dirwatch, "_libc", lambda: None)
    no_inotify = CodeTree(tmp_path)
    no_inotify.manifest()
    assert not no_inotify._watch.usable
    stats = _count_stats(monkeypatch)
    for n, tree in enumerate((on_nfs, no_inotify)):
        before = tree.manifest()
        stats.clear()
        (tmp_path / "a.py").write_text(f"A = {n + 10}\n")
        assert tree.manifest()["a.py"] != before["a.py"] and stats
        stats.clear()
        tree.manifest()
        assert any(p.endswith("a.py") for p in stats)  # unchanged, and still checked file by file


def test_filesystem_type_is_the_longest_mount_point_holding_the_path():
    mounts = [("/work/nfs", "nfs4"), ("/work", "ext4"), ("/", "overlay")]
    assert dirwatch_type("/work/nfs/proj/a", mounts) == "nfs4"
    assert dirwatch_type("/work/nfsother", mounts) == "ext4"
    assert dirwatch_type("/work", mounts) == "ext4"
    assert dirwatch_type("/home/me", mounts) == "overlay"


def dirwatch_type(path: str, mounts: list[tuple[str, str]]) -> str | None:
    from kt_jupyter.dirwatch import filesystem_type

    return filesystem_type(path, mounts)


def test_a_process_opens_few_inotify_instances_and_gives_them_back(tmp_path, monkeypatch):
    """The user's inotify instances are shared with all their programs (128 by default): at most
    MAX_INSTANCES trees of this process watch theirs (the others check by stat), and a closed tree's goes back."""
    import kt_jupyter.dirwatch as dirwatch

    import gc

    gc.collect()  # other tests' trees give theirs back first
    monkeypatch.setattr(dirwatch, "_open_instances", 0)
    (tmp_path / "a.py").write_text("A = 1\n")
    trees = [CodeTree(tmp_path) for _ in range(dirwatch.MAX_INSTANCES + 2)]
    for tree in trees:
        tree.manifest()
    if not trees[0]._watch.usable:
        pytest.skip("no inotify for this directory here")
    assert [t._watch.usable for t in trees] == [True] * dirwatch.MAX_INSTANCES + [False, False]
    assert dirwatch._open_instances == dirwatch.MAX_INSTANCES
    trees[0].close()
    assert dirwatch._open_instances == dirwatch.MAX_INSTANCES - 1
    late = CodeTree(tmp_path)
    late.manifest()
    assert late._watch.usable and dirwatch._open_instances == dirwatch.MAX_INSTANCES
    for tree in trees[1:] + [late]:
        tree.close()
    assert dirwatch._open_instances == 0
