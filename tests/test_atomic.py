"""Atomic writes: all or nothing, with a new file's usual permissions."""

import os
import stat

import pytest

from napari_cryoswan._atomic import atomic_path


def test_a_completed_write_replaces_the_file_with_default_permissions(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise OSError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_the_writers_built_on_it_replace_whole_files(tmp_path, monkeypatch):
    import json
    import shutil

    from napari_cryoswan._atomic import copy_atomic, write_json_atomic, write_text_atomic

    write_json_atomic(tmp_path / "a.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    write_text_atomic(tmp_path / "b.csv", "h\r\nv\r\n")
    assert (tmp_path / "b.csv").read_bytes() == b"h\r\nv\r\n"  # a CSV's line endings kept
    copy_atomic(tmp_path / "a.json", tmp_path / "c.json")
    assert (tmp_path / "c.json").read_bytes() == (tmp_path / "a.json").read_bytes()

    def half_a_copy(source, target):
        with open(target, "w") as f:
            f.write("{")
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", half_a_copy)
    with pytest.raises(OSError, match="disk full"):
        copy_atomic(tmp_path / "b.csv", tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.csv", "c.json"]
