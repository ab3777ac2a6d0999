"""The CLI's one exception boundary: expected failures are one line and exit 2, bugs say so and exit 1 (the
traceback with -v); float options are finite; range lists are bounded; names with markup print as text."""

from __future__ import annotations

import json
import zipfile
import zlib

import pytest

from conftest import random_trace, run
from moescope.cli import expected_failure
from moescope.errors import FormatError
from moescope.imports import write_output
from moescope.slicing import MAX_RANGE_ITEMS, parse_ranges


@pytest.fixture
def npz(tmp_path):
    path = tmp_path / "t.npz"
    write_output(random_trace(n_tokens=60, n_seq=6), path)
    return path


@pytest.mark.parametrize(
    ("exc", "needle"),
    [
        (FormatError("x.npz: bad"), "x.npz: bad"),
        (PermissionError(13, "Permission denied", "/ro/out.csv"), "permission denied: /ro/out.csv"),
        (FileNotFoundError(2, "No such file", "gone.npz"), "no such file or folder: gone.npz"),
        (IsADirectoryError(21, "Is a directory", "d"), "Is a directory"),
        (OSError(28, "No space left on device", "big.npz"), "big.npz: No space left on device (OS error 28)"),
        (zipfile.BadZipFile("Bad CRC-32"), "corrupt or truncated (BadZipFile: Bad CRC-32)"),
        (zlib.error("invalid distance"), "corrupt or truncated"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "corrupt or truncated"),
        (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        (OverflowError("int too large"), "too large (int too large)"),
        (MemoryError(), "out of memory"),
    ],
)
def test_expected_failures_are_one_line(exc, needle):
    line = expected_failure(exc)
    assert line is not None and needle in line and "\n" not in line


@pytest.mark.parametrize("exc", [KeyError("x"), IndexError("i"), TypeError("t"), AttributeError("a"), ValueError("v")])
def test_bugs_are_not_expected_failures(exc):
    assert expected_failure(exc) is None


def test_a_bug_says_so_exits_1_and_verbose_shows_the_traceback(capsys, monkeypatch, npz):
    from moescope.cli import _common

    def boom(*args, **kwargs):
        raise KeyError("planted")

    monkeypatch.setattr(_common.Inputs, "read_trace", boom)
    code, _, err = run(capsys, "place", npz, "-d", "2")
    assert code == 1 and "internal error (KeyError: 'planted')" in err and "this is a bug in moescope" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "-v", "place", npz, "-d", "2")
    assert code == 1 and "Traceback (most recent call last)" in err


def test_os_errors_are_clean(capsys, npz, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = run(capsys, "rank", npz, "-o", ro / "r.csv")
    finally:
        ro.chmod(0o755)
    if code == 0:
        pytest.skip("running as a user who may write anywhere (root)")
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_float_options_are_finite(capsys, npz, value):
    code, _, err = run(capsys, "cache", npz, "--pcie-gbps", value)
    assert code == 2 and "is not a finite number" in err


@pytest.mark.parametrize("value", ["1e999", "nan", "1e30GiB"])
def test_sizes_are_bounded(capsys, npz, value):
    code, _, err = run(capsys, "simulate", npz, "--expert-bytes", value, "--dense-bytes", "8MiB")
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err


def test_range_lists_are_bounded():
    with pytest.raises(Exception, match="above the largest accepted value"):
        parse_ranges("2-3000000000", "--devices")
    with pytest.raises(Exception, match="expands to more than"):
        parse_ranges(f"0-{MAX_RANGE_ITEMS}", "--sequences")
    assert len(parse_ranges(f"0-{MAX_RANGE_ITEMS - 1}", "--sequences")) == MAX_RANGE_ITEMS
    with pytest.raises(Exception, match=r"\.\.\."):  # a long bad list is cut in the message
        parse_ranges("x" * 500, "--layers")


def test_scheduler_values_are_checked(capsys, npz):
    pytest.importorskip("distributed")
    for value, needle in (("bogus", "expected local:N or a Dask scheduler address"), ("local:0", "1 <= N <= 256")):
        code, _, err = run(capsys, "place", npz, "-d", "2", "--scheduler", value)
        assert code == 2 and needle in err, err


def test_markup_in_names_prints_as_text(capsys, tmp_path):
    tr = random_trace(n_tokens=60, n_seq=6)
    path = tmp_path / "m.npz"
    write_output(tr.replace(seq_labels=["[/]", "[bold]x[/bold]"] * 3, meta=tr.meta.replace(model="[/]model")), path)
    code, out, err = run(capsys, "trace", "info", path)
    assert code == 0, err
    assert "[/]model" in out and "[bold]x[/bold]" in out
    code, out, err = run(capsys, "place", path, "-d", "2", "-m", "frequency", "--fit-labels", "[/]")
    assert code == 0, err
    assert "[/]" in out
    code, out, _ = run(capsys, "trace", "info", path, "--json")
    assert json.loads(out)["meta"]["model"] == "[/]model"
