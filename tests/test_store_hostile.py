"""The trace store against damage and misuse: flipped bytes, missing chunks, broken attributes, two writers
at once, killed writers, and stores written before checksums existed."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import random_trace, run
from moescope.errors import FormatError, OutputExistsError, UsageError
from moescope.imports import read_input, write_output
from moescope.slicing import select_tokens
from moescope.store import (
    _ATTRS,
    _REQUIRED,
    ATTR_KEY,
    INCOMPLETE_KEY,
    TraceStore,
    TraceWriter,
    WriterLock,
    is_store,
    load_trace,
    save_trace,
)

KW = {"n_experts": 8, "n_layers": 2, "top_k": 2}


def _small_store(path: Path):
    """A 40-token store of 8-token chunks with every array a store can hold (about 30 chunk files)."""
    tr = random_trace(n_tokens=40, n_seq=5, weights="float16", token_ids=True, lookahead=1, candidates=3)
    save_trace(tr, path, chunk_tokens=8)
    return tr


def _chunk_files(path: Path) -> list[tuple[str, int, Path]]:
    """``(array, chunk index along tokens or sequences, file)`` of every stored chunk."""
    out = []
    for f in sorted(path.glob("*/c/**/*")):
        if f.is_file():
            rel = f.relative_to(path).parts
            out.append((rel[0], int(rel[2]), f))
    return out


def _attrs(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"][ATTR_KEY]


def _set_attrs(path: Path, change) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    change(doc["attributes"][ATTR_KEY])
    (path / "zarr.json").write_text(json.dumps(doc))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# -- damaged chunks ---------------------------------------------------------------------------------


def test_a_flipped_byte_in_any_chunk_fails_its_checksum(tmp_path):
    path = tmp_path / "run.zarr"
    _small_store(path)
    files = _chunk_files(path)
    assert {a for a, _, _ in files} == {"experts", "weights", "seq_starts", "seq_label_codes", "token_ids",
                                        "lookahead", "candidates", "candidate_probs"}  # fmt: skip
    rng = np.random.default_rng(7)
    for array, index, f in files:
        good = f.read_bytes()
        for _ in range(2):  # two seeded flips per chunk: any byte, any bit (the checksum's own bytes too)
            bad = bytearray(good)
            bad[int(rng.integers(len(bad)))] ^= 1 << int(rng.integers(8))
            f.write_bytes(bytes(bad))
            with pytest.raises(FormatError) as err:
                load_trace(path)
            assert _one_line(err) == (
                f"{path}: chunk {index} of {array} fails its checksum (the file was changed or damaged); "
                f"re-capture or restore it"
            )
        f.write_bytes(good)
    assert load_trace(path).equals(_small_store(tmp_path / "again.zarr"))


def test_a_missing_chunk_is_an_error_not_zeros(tmp_path):
    path = tmp_path / "run.zarr"
    tr = _small_store(path)
    for array, index, f in _chunk_files(path):
        aside = f.with_name(f.name + ".aside")
        f.rename(aside)
        with pytest.raises(FormatError, match=rf"chunk {index} of {array} is missing") as err:
            load_trace(path)
        _one_line(err)
        aside.rename(f)
    assert load_trace(path).equals(tr)


def test_chunks_of_zeros_are_stored_and_read(tmp_path):
    """One sequence (seq_starts [0]) and all-zero weights: zarr would skip such chunks by default."""
    tr = random_trace(n_tokens=20, n_seq=1, weights="float32", labels=False)
    tr = tr.replace(weights=np.zeros_like(tr.weights), validate=False)
    save_trace(tr, tmp_path / "z.zarr", chunk_tokens=8)
    assert (tmp_path / "z.zarr" / "seq_starts" / "c" / "0").is_file()
    assert load_trace(tmp_path / "z.zarr").equals(tr)


def test_a_chunked_read_names_only_the_bad_chunk(tmp_path):
    path = tmp_path / "run.zarr"
    tr = _small_store(path)
    f = path / "experts" / "c" / "3" / "0" / "0"
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 0xFF]))
    store = TraceStore(path)
    np.testing.assert_array_equal(store.read(0, 24).trace.experts, tr.experts[:24])  # chunks 0-2 are fine
    with pytest.raises(FormatError, match=r"chunk 3 of experts fails its checksum"):
        store.read(20, 40)


def test_cli_reports_a_damaged_store_in_one_line(tmp_path, capsys):
    path = tmp_path / "run.zarr"
    _small_store(path)
    f = path / "weights" / "c" / "2" / "0" / "0"
    f.write_bytes(b"\0" * len(f.read_bytes()))
    code, _, err = run(capsys, "trace", "info", path)
    assert code == 2 and err.strip().splitlines() == [
        f"error: {path}: chunk 2 of weights fails its checksum (the file was changed or damaged); re-capture or "
        f"restore it"
    ]


# -- damaged metadata -------------------------------------------------------------------------------

_BAD_VALUES = ("x", -1, 1.5, True, None, [], ["a"], [-1], {}, {"a": "b"}, 10**9)


@pytest.mark.parametrize("key", list(_ATTRS))
def test_every_attribute_is_checked(tmp_path, key):
    """Each attribute of the table: missing (when required) and every value of the wrong type or range."""
    path = tmp_path / "run.zarr"
    _small_store(path)
    if _ATTRS[key].default is _REQUIRED:
        _set_attrs(path, lambda a: a.pop(key))
        with pytest.raises(FormatError, match=rf"'{key}' is missing|not a moescope trace store") as err:
            TraceStore(path)
        _one_line(err)
    bad = [v for v in _BAD_VALUES if not _ATTRS[key].ok(v)]
    assert len(bad) >= 5
    for value in bad:
        _set_attrs(path, lambda a, v=value: a.__setitem__(key, v))
        with pytest.raises(FormatError) as err:
            TraceStore(path)
        assert key in _one_line(err) or "not a moescope trace store" in str(err.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"committed_tokens": 48}, r"array experts is int16 \[40, 2, 2\], expected int16 \[48 or more, 2, 2\]"),
        ({"committed_tokens": 32}, r"the commit record says 40 rows of experts were written, but 32 are committed"),
        ({"committed_sequences": 0}, r"disagree: 0 sequences committed for 40 tokens"),
        ({"committed_sequences": 9}, r"array seq_starts is int64 \[5\], expected int64 \[9 or more\]"),
        ({"n_layers": 3}, r"layer_ids \[1, 2\] are not 3 distinct layers"),
        (
            {"n_layers": 3, "layer_ids": [1, 2, 3]},
            r"array experts is int16 \[40, 2, 2\], expected int16 \[40 or more, 3, 2\]",
        ),
        ({"layer_ids": [1, 1]}, r"layer_ids \[1, 1\] are not 2 distinct layers"),
        ({"top_k": 9}, r"top_k 9 > n_experts 8"),
        ({"chunk_tokens": 16}, r"experts is chunked by 8 tokens but the store attributes say chunk_tokens 16"),
        ({"weights_dtype": "float32"}, r"array weights is float16 \[40, 2, 2\], expected float32"),
        ({"extras": {"token_ids": [3]}}, r"extra token_ids has trailing shape \[3\], expected 0 dimensions"),
        (
            {"extras": {"lookahead": [2, 2, 2]}},
            r"array lookahead is int16 \[40, 2, 1, 2\], expected int16 \[40 or more, 2, 2, 2\]",
        ),
        ({"label_names": ["law"]}, r"seq_label_codes holds [12] but there are 1 label_names"),
        ({"label_names": ["law", "law", "chat"]}, r"label_names \['law', 'law', 'chat'\] repeat a name"),
        ({"written": {}}, r"the commit record says None rows of experts were written, but 40 are committed"),
    ],
)
def test_attributes_that_disagree_with_the_arrays(tmp_path, change, match):
    path = tmp_path / "run.zarr"
    _small_store(path)
    _set_attrs(path, lambda a: a.update(change))
    with pytest.raises(FormatError, match=match) as err:
        load_trace(path)
    _one_line(err)


def test_seq_starts_out_of_order_are_refused(tmp_path):
    path = tmp_path / "run.zarr"
    _small_store(path)
    arr = zarr.open_array(zarr.storage.LocalStore(path / "seq_starts"), mode="r+")
    arr[1] = 0
    with pytest.raises(FormatError, match=r"seq_starts \[0, 0, .* do not increase from 0"):
        TraceStore(path)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("[]", r"its zarr.json is \[\], not a JSON object"),
        ('"text"', r"its zarr.json is 'text', not a JSON object"),
        ("{not json", r"its zarr.json is not readable JSON"),
        ('{"zarr_format": 3, "node_type": "group", "attributes": []}', r"the attributes in its zarr.json are \[\]"),
        ('{"zarr_format": 3, "node_type": "group", "attributes": {"moescope": [1]}}', r"moescope attributes .* \[1\]"),
    ],
)
def test_a_group_zarr_json_that_is_not_an_object(tmp_path, doc, match):
    path = tmp_path / "run.zarr"
    _small_store(path)
    (path / "zarr.json").write_text(doc)
    assert not is_store(path)
    with pytest.raises(FormatError, match=match) as err:
        TraceStore(path)
    _one_line(err)


@pytest.mark.parametrize("doc", ["[]", "{}", "{not json", '{"zarr_format": 3, "node_type": "array"}', None])
def test_a_damaged_array_zarr_json(tmp_path, doc):
    path = tmp_path / "run.zarr"
    _small_store(path)
    if doc is None:
        (path / "weights" / "zarr.json").unlink()
    else:
        (path / "weights" / "zarr.json").write_text(doc)
    with pytest.raises(FormatError, match=r"weights") as err:
        TraceStore(path)
    _one_line(err)


def test_an_array_stripped_of_its_checksum_codec(tmp_path):
    path = tmp_path / "run.zarr"
    _small_store(path)
    meta = json.loads((path / "experts" / "zarr.json").read_text())
    meta["codecs"] = [c for c in meta["codecs"] if c["name"] != "crc32c"]
    (path / "experts" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"array experts lost its crc32c checksum codec"):
        TraceStore(path)


# -- stores written before checksums ------------------------------------------------------------------


def _write_old_store(path: Path, tr, chunk_tokens: int) -> None:
    """A store as moescope wrote them before checksums: zarr's default codecs, chunks of zeros skipped, no
    ``written`` record."""
    group = zarr.open_group(zarr.storage.LocalStore(path), mode="w-", zarr_format=3)
    shape3, chunks3 = tr.experts.shape, (chunk_tokens, tr.n_layers, tr.top_k)
    group.create_array("experts", shape=shape3, chunks=chunks3, dtype=np.int16)[:] = tr.experts
    if tr.weights is not None:
        group.create_array("weights", shape=shape3, chunks=chunks3, dtype=tr.weights.dtype)[:] = tr.weights
    group.create_array("seq_starts", shape=tr.seq_starts.shape, chunks=(1 << 16,), dtype=np.int64)[:] = tr.seq_starts
    names = list(dict.fromkeys(tr.seq_labels.tolist()))
    codes = np.asarray([names.index(x) for x in tr.seq_labels], dtype=np.int32)
    group.create_array("seq_label_codes", shape=codes.shape, chunks=(1 << 16,), dtype=np.int32)[:] = codes
    group.attrs[ATTR_KEY] = {
        "format": "moescope.trace", "version": 1, "n_experts": tr.n_experts, "n_layers": tr.n_layers,
        "top_k": tr.top_k, "layer_ids": tr.layer_ids.tolist(), "phase": tr.phase, "meta": tr.meta.to_dict(),
        "weights_dtype": None if tr.weights is None else tr.weights.dtype.name, "extras": {},
        "chunk_tokens": chunk_tokens, "label_names": names, "labelled": True,
        "committed_tokens": tr.n_tokens, "committed_sequences": tr.n_sequences, "complete": True,
    }  # fmt: skip


@pytest.mark.parametrize("n_seq", [1, 4])
def test_stores_written_before_checksums_still_read(tmp_path, n_seq):
    tr = random_trace(n_tokens=40, n_seq=n_seq, weights="float32")
    path = tmp_path / "old.zarr"
    _write_old_store(path, tr, chunk_tokens=16)
    assert (n_seq == 1) == (not (path / "seq_starts" / "c" / "0").exists())  # [0] was never stored
    assert load_trace(path).equals(tr)
    assert [c.trace.n_tokens for c in TraceStore(path).iter_chunks()] == [16, 16, 8]


def test_a_store_read_through_a_url_is_checked_alike(tmp_path):
    path = tmp_path / "run.zarr"
    tr = _small_store(path)
    assert load_trace(path.as_uri()).equals(tr)
    (path / "experts" / "c" / "2" / "0" / "0").unlink()
    with pytest.raises(FormatError, match=r"^file://.*run.zarr: chunk 2 of experts is missing"):
        load_trace(path.as_uri())


def test_an_undecodable_chunk_of_an_old_store_is_a_format_error(tmp_path):
    tr = random_trace(n_tokens=40, weights=None)
    path = tmp_path / "old.zarr"
    _write_old_store(path, tr, chunk_tokens=16)
    f = path / "experts" / "c" / "1" / "0" / "0"
    f.write_bytes(f.read_bytes()[:9])
    with pytest.raises(FormatError, match=r"old.zarr: chunk 1 of experts cannot be decoded \(RuntimeError: ") as err:
        load_trace(path)
    _one_line(err)


# -- one writer per path ----------------------------------------------------------------------------

_CHILD = """
import sys
import numpy as np
from moescope.store import TraceWriter
w = TraceWriter(sys.argv[1], n_experts=8, n_layers=2, top_k=2, chunk_tokens=4, atomic=False)
w.append(np.tile(np.array([[0, 1], [2, 3]], dtype=np.int16), (8, 1, 1)))
sys.stdin.read()  # hold the writer open until the test closes our stdin
w.close()
"""


def _wait_for(cond, proc: subprocess.Popen, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert proc.poll() is None, f"the writer process exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {limit} s"
        time.sleep(0.05)


def test_a_second_writer_fails_while_the_first_runs(tmp_path, caplog):
    path = tmp_path / "run.zarr"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdin=subprocess.PIPE, cwd=tmp_path)
    try:
        _wait_for(lambda: is_store(path) and TraceStore(path, warn_incomplete=False).n_tokens == 8, proc, "8 tokens")
        busy = (
            rf"^{re.escape(str(path))} is being written by process {proc.pid} \(since \d\d:\d\d\); "
            rf"wait for it to finish or write elsewhere$"
        )
        tr = random_trace(n_tokens=10, weights=None)
        for kwargs in ({"atomic": False, "overwrite": True}, {"atomic": True, "overwrite": True}, {}):
            t0 = time.monotonic()
            with pytest.raises(UsageError, match=busy):
                TraceWriter(path, **KW, **kwargs)
            assert time.monotonic() - t0 < 2.0
        with pytest.raises(UsageError, match=busy):
            save_trace(tr, path, overwrite=True)
        with pytest.raises(UsageError, match=busy):
            WriterLock.check_free(path)  # the early check a capture makes before loading its model
        with caplog.at_level(logging.WARNING, logger="moescope.store"):
            live = TraceStore(path)  # readers ignore the lock and see the committed tokens
        assert live.n_tokens == 8 and live.writer is not None and live.writer.pid == proc.pid
        since = time.strftime("%H:%M", time.localtime(live.writer.since))
        assert [r.getMessage() for r in caplog.records] == [
            f"{path} is incomplete: process {proc.pid} is still writing it (since {since}); "
            f"reading the 1 sequence (8 tokens) committed so far"
        ]
        assert sorted(p.name for p in tmp_path.iterdir()) == [".run.zarr.lock", "run.zarr"]  # nothing deleted
    finally:
        proc.communicate(b"", timeout=60)
    assert proc.returncode == 0
    assert TraceStore(path).complete and not WriterLock.file_for(path).exists()
    WriterLock.check_free(path)
    save_trace(tr, path, overwrite=True)  # free again
    assert load_trace(path).equals(tr)


def test_a_second_writer_in_the_same_process_fails(tmp_path):
    with TraceWriter(tmp_path / "a.zarr", **KW, atomic=False) as w:
        with pytest.raises(UsageError, match=rf"is being written by process {os.getpid()} "):
            TraceWriter(tmp_path / "a.zarr", **KW, overwrite=True)
        w.append(random_trace(weights=None).experts)
    assert TraceStore(tmp_path / "a.zarr").n_tokens == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _write_lock(path: Path, pid: int, host: str) -> None:
    record = {"pid": pid, "host": host, "since": time.time() - 3600, "token": "t" * 32}
    WriterLock.file_for(path).write_text(json.dumps(record))


def test_a_dead_writers_lock_is_taken_over(tmp_path, caplog):
    path = tmp_path / "run.zarr"
    tr = random_trace(weights=None)
    save_trace(tr, path)
    pid = _dead_pid()
    _write_lock(path, pid, socket.gethostname())
    with caplog.at_level(logging.INFO, logger="moescope.store"):
        save_trace(tr, path, overwrite=True)
    assert f"removed the write lock of process {pid}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.zarr"]


def test_a_dead_writers_lock_goes_to_exactly_one_of_many_takers(tmp_path):
    """Eight threads race to take over one stale lock: one gets it, the others see it held."""
    path = tmp_path / "run.zarr"
    _write_lock(path, _dead_pid(), socket.gethostname())
    barrier = threading.Barrier(8)
    got, busy = [], []

    def take() -> None:
        barrier.wait()
        try:
            got.append(WriterLock.acquire(path))
        except UsageError as exc:
            busy.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 1 and len(busy) == 7 and all("is being written by process" in m for m in busy)
    got[0].release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    path = tmp_path / "run.zarr"
    _write_lock(path, _dead_pid(), "elsewhere.example")
    lock = re.escape(str(WriterLock.file_for(path)))
    with pytest.raises(UsageError, match=rf"on host elsewhere.example .*\(if that process is gone, delete {lock}\)$"):
        save_trace(random_trace(), path)


def test_an_unreadable_lock_is_refused_not_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr("moescope._store_lock.LOCK_WAIT_SECONDS", 0.3)
    path = tmp_path / "run.zarr"
    WriterLock.file_for(path).write_text("garbage")
    with pytest.raises(UsageError, match=r"its content is unreadable .*delete that file, or write elsewhere$"):
        save_trace(random_trace(), path)
    assert WriterLock.file_for(path).read_text() == "garbage"


def test_the_lock_is_released_on_every_exit(tmp_path):
    lock = WriterLock.file_for(tmp_path / "a.zarr")
    with pytest.raises(RuntimeError), TraceWriter(tmp_path / "a.zarr", **KW) as w:
        assert lock.exists()
        raise RuntimeError("boom")
    assert w._closed and not lock.exists()
    w = TraceWriter(tmp_path / "a.zarr", **KW, atomic=False)
    del w  # dropped without close (the capture "died" in this process): the lock goes with it
    assert not lock.exists()
    with pytest.raises(OutputExistsError):  # refused after taking the lock: released again
        TraceWriter(tmp_path / "a.zarr", **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]


# -- incomplete stores ------------------------------------------------------------------------------


def _killed_capture(path: Path, n_tokens: int = 20) -> None:
    tr = random_trace(n_tokens=n_tokens + 4, n_seq=2, weights=None, labels=False)
    w = TraceWriter(path, **KW, chunk_tokens=4, atomic=False)
    w.append(tr.experts[:10])
    w.append(tr.experts[10 : n_tokens + 2], seq_starts=[])  # a commit at n_tokens, 2 tokens buffered
    del w  # "killed": the buffered tokens are lost


def test_the_incomplete_mark_survives_every_save(tmp_path):
    src = tmp_path / "killed.zarr"
    _killed_capture(src)
    trace = load_trace(src)
    mark = {"store": str(src), "tokens": 20, "sequences": 1}
    assert trace.meta.extra[INCOMPLETE_KEY] == mark
    save_trace(trace, tmp_path / "copy.zarr")
    save_trace(select_tokens(trace, 0, 12), tmp_path / "slice.zarr")
    write_output(trace, tmp_path / "t.npz")
    write_output(read_input(tmp_path / "t.npz"), tmp_path / "via_npz.zarr")
    for name in ("copy.zarr", "slice.zarr", "via_npz.zarr"):
        store = TraceStore(tmp_path / name)
        assert not store.complete and store.meta.extra[INCOMPLETE_KEY] == mark
        assert store.incomplete_notice.startswith(
            f"{tmp_path / name} is incomplete: it was written from the incomplete store {src}"
        )
    save_trace(random_trace(), tmp_path / "whole.zarr")
    assert TraceStore(tmp_path / "whole.zarr").complete
    assert INCOMPLETE_KEY not in load_trace(tmp_path / "whole.zarr").meta.extra


def test_cli_convert_of_an_incomplete_store_stays_incomplete(tmp_path, capsys):
    src = tmp_path / "killed.zarr"
    _killed_capture(src)
    code, _, err = run(capsys, "trace", "convert", src, tmp_path / "out.zarr")
    assert code == 0 and err.count("is incomplete") == 1
    assert _attrs(tmp_path / "out.zarr")["complete"] is False


def test_an_incomplete_store_warns_once(tmp_path, caplog):
    path = tmp_path / "killed.zarr"
    _killed_capture(path)
    with caplog.at_level(logging.WARNING, logger="moescope.store"):
        load_trace(path)
        first = [r.getMessage() for r in caplog.records]
        TraceStore(path).read(0, 5)  # the same store again (a command reopening it per chunk): no repeat
        assert (
            [r.getMessage() for r in caplog.records]
            == first
            == [
                f"{path} is incomplete: its writer stopped without closing it (killed or crashed); reading the "
                f"1 sequence (20 tokens) committed"
            ]
        )
        _killed_capture(tmp_path / "quiet.zarr")
        TraceStore(tmp_path / "quiet.zarr", warn_incomplete=False)
        save_trace(random_trace(), tmp_path / "whole.zarr")
        load_trace(tmp_path / "whole.zarr")
    assert len(caplog.records) == 1


def test_an_in_place_replace_leaves_the_old_store_or_the_complete_new_one(tmp_path):
    """A capture over an old store keeps the old one aside until it completes: an abort, or a kill and the next
    run's recovery, puts it back; a clean close removes it."""
    from moescope import _atomic

    path = tmp_path / "run.zarr"
    old = random_trace(n_tokens=12, n_seq=2, weights=None, labels=False)
    save_trace(old, path)
    new = random_trace(n_tokens=20, n_seq=2, weights=None, labels=False, seed=3)
    w = TraceWriter(path, **KW, chunk_tokens=4, atomic=False, overwrite=True)
    w.append(new.experts[:8], seq_starts=[0])
    w.flush()
    w.abort()
    assert load_trace(path).equals(old, check_meta=False)
    w = TraceWriter(path, **KW, chunk_tokens=4, atomic=False, overwrite=True)
    w.append(new.experts[:8], seq_starts=[0])
    w.flush()
    aside = [p for p in tmp_path.iterdir() if ".old-" in p.name]
    assert len(aside) == 1
    # "killed": the writer's lock and the old store's name carry a pid that is no longer running
    dead = 2**22 + 12345
    w._release.detach()
    lock = WriterLock.file_for(path)
    lock.write_text(lock.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {dead}'))
    aside[0].rename(aside[0].with_name(aside[0].name.replace(f"-{os.getpid()}-", f"-{dead}-")))
    del w
    assert _atomic.recover(path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".run.zarr.lock"]
    assert load_trace(path).equals(old, check_meta=False)  # reading it removes the dead writer's lock
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with TraceWriter(path, **KW, chunk_tokens=4, atomic=False, overwrite=True) as w:
        w.append(new.experts, seq_starts=new.seq_starts)
    got = load_trace(path)
    np.testing.assert_array_equal(got.experts, new.experts)
    np.testing.assert_array_equal(got.seq_starts, new.seq_starts)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
