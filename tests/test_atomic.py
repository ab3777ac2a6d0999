"""Atomic outputs: nothing half-written, existing outputs kept unless overwrite is asked, and then only files
and moescope's own folders of the same kind; never an input; dead writers' leftovers cleaned, live ones kept.
(Real kills: tests/test_kill.py.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_trace, run
from moescope import _atomic, fixture
from moescope._atomic import atomic_path, check_output, folder_kind, recover, remove, replace_into, write_text_atomic
from moescope.errors import OutputExistsError, UsageError
from moescope.imports import write_output
from moescope.store import load_trace, save_trace


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    return int(proc.stdout)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _foreign(folder: Path, n: int = 12) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"notes-{i}.txt").write_text(str(i))
    return folder


def test_write_and_overwrite(tmp_path):
    p = tmp_path / "a.txt"
    write_text_atomic(p, "one")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        write_text_atomic(p, "two")
    assert p.read_text() == "one"
    write_text_atomic(p, "two", overwrite=True)
    assert p.read_text() == "two" and _names(tmp_path) == ["a.txt"]


def test_error_inside_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(p, overwrite=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert p.read_text() == "old" and _names(tmp_path) == ["a.txt"]


def test_missing_folder(tmp_path):
    with pytest.raises(UsageError, match="does not exist; create it first"):
        check_output(tmp_path / "no" / "x.npz", overwrite=False)


def test_overwrite_never_deletes_a_foreign_folder(tmp_path, capsys, monkeypatch):
    d = _foreign(tmp_path / "somefolder")
    msg = f"output '{d}' is a folder that moescope did not write (12 entries); pass a file path or an empty/new folder"
    with pytest.raises(OutputExistsError) as exc:
        check_output(d, overwrite=True)
    assert str(exc.value) == msg
    with pytest.raises(OutputExistsError, match="is a folder \\(12 entries\\) but this writes a file"):
        write_text_atomic(d, "x", overwrite=True)
    with pytest.raises(OutputExistsError, match="did not write"):
        save_trace(random_trace(), d, overwrite=True)
    code, _, err = run(capsys, "rank", fixture.TRACE, "-o", d, "--overwrite")
    assert code == 2 and "is a folder (12 entries) but this writes a file" in err
    code, _, err = run(capsys, "trace", "convert", fixture.TRACE, d, "--to", "zarr", "--overwrite")
    assert code == 2 and err.strip() == f"error: {msg}"
    assert _names(d) == sorted(f"notes-{i}.txt" for i in range(12)) and _names(tmp_path) == ["somefolder"]
    monkeypatch.chdir(d)  # '.', '..' and '/' are refused by name, before anything is written
    for out in (".", "..", "/"):
        code, _, err = run(capsys, "rank", fixture.TRACE, "-o", out, "--overwrite")
        assert code == 2 and "names a folder by '.', '..' or '/'" in err, out
    assert _names(d) == sorted(f"notes-{i}.txt" for i in range(12)) and _names(tmp_path) == ["somefolder"]


def test_overwrite_replaces_files_and_same_kind_folders(tmp_path):
    old, new = random_trace(seed=1), random_trace(seed=2)
    store = save_trace(old, tmp_path / "t.zarr")
    assert folder_kind(store) == _atomic.TRACE_STORE
    save_trace(new, store, overwrite=True)
    assert load_trace(store).equals(new) and _names(tmp_path) == ["t.zarr"]
    with pytest.raises(OutputExistsError, match="is a moescope trace store, not a split output"):
        check_output(store, overwrite=True, kind=_atomic.SPLIT_OUTPUT)
    # a writer that only declares its kind at the commit (ESFT logs over a store) is refused there, store intact
    with pytest.raises(OutputExistsError, match="is a moescope trace store, not a ESFT log folder"):
        write_output(new, store, "esft", overwrite=True)
    assert load_trace(store).equals(new) and _names(tmp_path) == ["t.zarr"]
    logs = write_output(old, tmp_path / "logs", "esft")
    assert folder_kind(logs) == _atomic.ESFT_LOGS
    write_output(new, logs, "esft", overwrite=True)
    ref = write_output(new, tmp_path / "ref", "esft")
    assert _tree(logs) == _tree(ref)
    shutil.rmtree(ref)
    # a file becomes a store, a store never becomes a file
    f = tmp_path / "f.zarr"
    f.write_text("a file")
    save_trace(old, f, overwrite=True)
    assert load_trace(f).equals(old)
    with pytest.raises(OutputExistsError, match="this writes a file"):
        write_output(old, store, "npz", overwrite=True)
    assert _names(tmp_path) == ["f.zarr", "logs", "t.zarr"]


def test_empty_folder_takes_a_folder_not_a_file(tmp_path):
    d = tmp_path / "d.zarr"
    d.mkdir()
    save_trace(random_trace(), d)  # nothing to lose: no --overwrite needed
    assert folder_kind(d) == _atomic.TRACE_STORE
    e = tmp_path / "e"
    e.mkdir()
    with pytest.raises(OutputExistsError, match=r"is a folder \(0 entries\) but this writes a file"):
        write_text_atomic(e, "x", overwrite=True)


def test_moescope_folders_are_recognised_strictly(tmp_path):
    store = save_trace(random_trace(), tmp_path / "t.zarr")
    (store / "mine.txt").write_text("not zarr")
    assert folder_kind(store) is None  # something else lives inside: not ours to delete
    split = tmp_path / "parts"
    split.mkdir()
    (split / "split.json").write_text('{"groups": [{"file": "m.group-1-of-1.gguf"}]}')
    (split / "m.group-1-of-1.gguf").write_bytes(b"GGUF")
    assert folder_kind(split) == _atomic.SPLIT_OUTPUT
    (split / "other-model.gguf").write_bytes(b"GGUF")
    assert folder_kind(split) is None
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "zarr.json").write_text('{"attributes": {}}')
    assert folder_kind(tmp_path / "plain") is None


def test_a_killed_captures_stub_is_recognised_by_its_dead_writers_lock(tmp_path, dead_pid):
    stub = tmp_path / "cap.zarr"  # what an in-place writer leaves when killed before its first commit record
    (stub / "experts").mkdir(parents=True)
    (stub / f"zarr.{'0' * 32}.partial").write_text("{")  # zarr's own temporary, killed while writing
    lock = tmp_path / ".cap.zarr.lock"
    assert folder_kind(stub) is None  # no lock: any zarr group, not ours
    for pid, host, kind in [
        (dead_pid, socket.gethostname(), _atomic.TRACE_STORE),
        (os.getpid(), socket.gethostname(), _atomic.TRACE_STORE),  # this writer took the lock over
        (os.getppid(), socket.gethostname(), None),  # its writer is alive
        (dead_pid, "elsewhere", None),  # cannot tell from here
    ]:
        lock.write_text(json.dumps({"pid": pid, "host": host, "since": 0, "token": "x"}))
        assert folder_kind(stub) == kind, (pid, host)
        (stub / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
        assert folder_kind(stub) == kind, (pid, host)
        (stub / "zarr.json").unlink()
    (stub / "notes.txt").write_text("mine")
    assert folder_kind(stub) is None  # something else inside: never ours to delete
    (stub / "notes.txt").unlink()
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": 0, "token": "x"}))
    with pytest.raises(OutputExistsError, match=f"is being written by process {os.getppid()}; wait for it"):
        check_output(stub, overwrite=True)


def test_marks_match_the_writers():
    from moescope import store
    from moescope.gguf import split
    from moescope.imports import esft

    assert (_atomic.STORE_ATTR, _atomic.STORE_FORMAT) == (store.ATTR_KEY, store.FORMAT_NAME)
    lock = store.WriterLock.file_for(Path("/d/run.zarr"))
    assert lock == Path("/d") / _atomic.STORE_LOCK.format(name="run.zarr")
    assert _atomic.SPLIT_MANIFEST == split.MANIFEST
    assert _atomic.ESFT_LAYER_FILE.fullmatch(esft.LAYER_FILE.format(layer=17))


def test_output_may_not_be_an_input(tmp_path, capsys):
    npz = tmp_path / "t.npz"
    write_output(random_trace(), npz)
    store = save_trace(random_trace(), tmp_path / "t.zarr")
    (tmp_path / "link.npz").symlink_to(npz)
    os.link(npz, tmp_path / "hard.npz")
    before = {p: p.read_bytes() for p in (npz, store / "zarr.json")}
    cases = [
        (("convert", npz, npz), "is the input"),
        (("convert", store, store), "is the input"),
        (("convert", npz, tmp_path / "link.npz"), "is the input"),
        (("convert", tmp_path / "link.npz", npz), "is the input"),
        (("convert", npz, tmp_path / "hard.npz"), "is the input"),
        (("slice", store, store, "--layers", "1"), "is the input"),
        (("convert", store, store / "x.npz"), "is inside the input folder"),
        (("slice", npz, tmp_path, "--to", "zarr", "--layers", "1"), "holds the input"),
    ]
    for args, match in cases:
        code, _, err = run(capsys, "trace", *args, "--overwrite")
        assert code == 2 and match in err, (args, err)
    code, _, err = run(capsys, "import", "npz", npz, "-o", npz, "--overwrite")
    assert code == 2 and "is the input" in err
    code, _, err = run(capsys, "rank", npz, "-o", npz, "--overwrite")
    assert code == 2 and "is the input" in err
    assert {p: p.read_bytes() for p in before} == before
    with pytest.raises(UsageError, match="holds the input"):
        check_output(tmp_path, True, inputs=[None, "s3://bucket/x.zarr", store / "zarr.json"])


def test_temp_names_carry_the_owner(tmp_path):
    t = _atomic.temp_sibling(tmp_path / "a.npz")
    assert t.parent == tmp_path and t.name.startswith(f".a.npz.tmp-{os.getpid()}-")
    with_suffix = t.with_name(t.name + ".npz")
    with_suffix.write_bytes(b"")
    assert _atomic.leftovers(tmp_path / "a.npz") == [(with_suffix, "tmp", os.getpid())]
    assert _atomic.leftovers(tmp_path / "a") == []  # another target's names are not these


def test_dead_writers_leftovers_go_live_ones_stay(tmp_path, dead_pid):
    target = tmp_path / "a.zarr"
    dead_tmp = tmp_path / f".a.zarr.tmp-{dead_pid}-0123456789ab"
    dead_tmp.mkdir()
    (dead_tmp / "chunk").write_bytes(b"x" * 100)
    dead_del = tmp_path / f".a.zarr.del-{dead_pid}-0123456789ab"
    dead_del.write_bytes(b"x")
    live = tmp_path / f".a.zarr.tmp-{os.getppid()}-0123456789ab"  # the parent process is alive
    live.mkdir()
    mine = _atomic.temp_sibling(target)
    mine.mkdir()
    keep = [tmp_path / ".a.zarr.tmp-0123456789ab", tmp_path / f".b.zarr.tmp-{dead_pid}-0123456789ab"]
    for p in keep:  # an older name without owner, and another target's leftover
        p.mkdir()
    save_trace(random_trace(), target)
    assert _names(tmp_path) == sorted(["a.zarr", live.name, mine.name, *(p.name for p in keep)])


def test_recover_an_interrupted_folder_replace(tmp_path, dead_pid):
    old, new = random_trace(seed=1), random_trace(seed=2)
    target = tmp_path / "t.zarr"
    # killed between "old -> .old" and "new -> name": the old output comes back, the new temporary goes
    save_trace(old, tmp_path / f".t.zarr.old-{dead_pid}-0123456789ab")
    save_trace(new, tmp_path / f".t.zarr.tmp-{dead_pid}-0123456789ab")
    done = recover(target)
    assert len(done) == 2 and "restored" in done[0]
    assert load_trace(target).equals(old) and _names(tmp_path) == ["t.zarr"]
    # killed after "new -> name": the new output stays, the old one goes
    save_trace(old, tmp_path / f".t.zarr.old-{dead_pid}-0123456789ab")
    assert len(recover(target)) == 1 and load_trace(target).equals(old) and _names(tmp_path) == ["t.zarr"]
    # a live writer's moved-aside output is its own business
    shutil.rmtree(target)
    aside = tmp_path / f".t.zarr.old-{os.getppid()}-0123456789ab"
    save_trace(old, aside)
    assert recover(target) == [] and _names(tmp_path) == [aside.name]
    # a part read inside a split folder that a replace had moved aside: the folder comes back
    parts = tmp_path / f".parts.old-{dead_pid}-0123456789ab"
    parts.mkdir()
    (parts / "m.gguf").write_bytes(b"GGUF")
    recover(tmp_path / "parts" / "m.gguf")
    assert (tmp_path / "parts" / "m.gguf").read_bytes() == b"GGUF"


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "two-renames"])
def test_folder_replace_with_and_without_an_atomic_swap(tmp_path, monkeypatch, swap):
    if swap and _atomic._renameat2() is None:
        pytest.skip("renameat2 is not available here (not Linux / old glibc)")
    if not swap:
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    old, new = random_trace(seed=1), random_trace(seed=2)
    target = save_trace(old, tmp_path / "t.zarr")
    save_trace(new, target, overwrite=True)
    assert load_trace(target).equals(new) and _names(tmp_path) == ["t.zarr"]
    # a failure between the renames puts the old one back at once
    tmp = save_trace(old, tmp_path / ".t.zarr.tmp-1-0123456789ab")
    real = os.rename

    def failing(a, b):
        if Path(a) == tmp:
            raise OSError("disk gone")
        real(a, b)

    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="disk gone"):
        replace_into(tmp, target, overwrite=True)
    monkeypatch.setattr(os, "rename", real)
    assert load_trace(target).equals(new) and _names(tmp_path) == sorted(["t.zarr", tmp.name])


def test_remove_moves_a_folder_aside_before_deleting(tmp_path, monkeypatch):
    d = save_trace(random_trace(), tmp_path / "t.zarr")

    def interrupted(path, ignore_errors=False):
        raise KeyboardInterrupt  # as if killed while deleting

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        remove(d)
    (aside,) = tmp_path.iterdir()
    assert aside.name.startswith(f".t.zarr.del-{os.getpid()}-")  # never a half-deleted t.zarr
    monkeypatch.undo()
    remove(aside)
    remove(tmp_path / "missing")
    assert _names(tmp_path) == []


def test_alive():
    assert _atomic.pid_alive(os.getpid()) and _atomic.pid_alive(os.getppid())
    assert not _atomic.pid_alive(2**62)
