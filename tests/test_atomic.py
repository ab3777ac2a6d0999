"""Atomic outputs: nothing half-written, existing outputs kept unless overwrite is asked."""

from __future__ import annotations

import pytest

from moescope._atomic import atomic_path, check_output, write_text_atomic
from moescope.errors import OutputExistsError, UsageError


def test_write_and_overwrite(tmp_path):
    p = tmp_path / "a.txt"
    write_text_atomic(p, "one")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        write_text_atomic(p, "two")
    assert p.read_text() == "one"
    write_text_atomic(p, "two", overwrite=True)
    assert p.read_text() == "two" and [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_error_inside_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(p, overwrite=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_folder_replaced_whole(tmp_path):
    p = tmp_path / "d"
    p.mkdir()
    (p / "old").write_text("x")
    with atomic_path(p, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert [x.name for x in p.iterdir()] == ["new"] and [x.name for x in tmp_path.iterdir()] == ["d"]


def test_missing_folder(tmp_path):
    with pytest.raises(UsageError, match="does not exist; create it first"):
        check_output(tmp_path / "no" / "x.npz", overwrite=False)
