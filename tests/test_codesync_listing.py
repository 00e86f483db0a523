"""The code manifest is not walked again while no directory changed, yet every change is seen (codesync.py)."""

from __future__ import annotations

import os

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
