"""The command line: every command runs, bad input exits 2 with one line and leaves nothing behind."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import random_trace, run
from moescope.imports import read_input, write_output


@pytest.fixture
def npz(tmp_path):
    path = tmp_path / "t.npz"
    write_output(random_trace(n_tokens=60, n_seq=6), path)
    return path


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "trace" in out and "demo" in out
    code, out, _ = run(capsys, "trace", "slice", "--help")
    assert code == 0 and "--split" in out and "Example" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("moescope ")


def test_info_table_and_json(capsys, npz, tmp_path):
    code, out, _ = run(capsys, "trace", "info", npz)
    assert code == 0 and "per-layer load" in out and "tiny-test" in out
    code, out, _ = run(capsys, "trace", "info", npz, "--json")
    d = json.loads(out)
    assert d["tokens"] == 60 and d["sequences"] == 6 and len(d["layers_summary"]) == 2
    run(capsys, "trace", "convert", npz, tmp_path / "t.zarr")
    code, out, _ = run(capsys, "trace", "info", tmp_path / "t.zarr", "--json")
    d2 = json.loads(out)
    assert code == 0 and d2["layers_summary"] == d["layers_summary"] and d2["complete"] is True


def test_convert_chain_is_exact(capsys, npz, tmp_path):
    assert run(capsys, "trace", "convert", npz, tmp_path / "a.zarr")[0] == 0
    assert run(capsys, "trace", "convert", tmp_path / "a.zarr", tmp_path / "b.npz")[0] == 0
    assert run(capsys, "trace", "convert", tmp_path / "b.npz", tmp_path / "c.json")[0] == 0
    assert read_input(tmp_path / "b.npz").equals(read_input(npz))
    np.testing.assert_array_equal(read_input(tmp_path / "c.json").values, read_input(npz).counts().values)


def test_slice_split_and_labels(capsys, npz, tmp_path):
    code, _, err = run(capsys, "trace", "slice", npz, tmp_path / "train.npz", "--split", "train")
    assert code == 0 and "wrote" in err
    code, _, _ = run(capsys, "trace", "slice", npz, tmp_path / "law.zarr", "--labels", "law", "--layers", "2")
    law = read_input(tmp_path / "law.zarr")
    assert code == 0 and set(law.seq_labels.tolist()) == {"law"} and law.layer_ids.tolist() == [2]
    code, _, _ = run(capsys, "trace", "slice", npz, tmp_path / "tok.npz", "--tokens", "10:20", "--sequences", "0-3")
    assert code == 0 and read_input(tmp_path / "tok.npz").n_tokens == 10


def test_formats_lists_registry(capsys):
    from moescope.imports import READERS, WRITERS

    code, out, _ = run(capsys, "trace", "formats", "--json")
    names = {r["name"] for r in json.loads(out)}
    assert code == 0 and names == set(READERS) | set(WRITERS)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["trace", "info", "{missing}"], "does not exist"),
        (["trace", "convert", "{npz}", "{out}", "--top-k", "3"], "--top-k does not apply to 'npz' input"),
        (["trace", "convert", "{counts}", "{out}"], "needs a per-token trace"),
        (["trace", "convert", "{npz}", "{tmp}/x.parquet"], "cannot tell the output format"),
        (["trace", "convert", "{npz}", "{tmp}/nodir/x.zarr"], "does not exist; create it first"),
        (["trace", "slice", "{npz}", "{out}"], "nothing to slice"),
        (["trace", "slice", "{npz}", "{out}", "--split", "val"], "--split 'val'"),
        (["trace", "slice", "{npz}", "{out}", "--tokens", "a:b"], "--tokens 'a:b'"),
        (["trace", "slice", "{npz}", "{out}", "--labels", "poetry"], "not in this trace"),
        (["trace", "slice", "{npz}", "{out}", "--layers", "9"], r"layer\(s\) \[9\]"),
        (["trace", "info", "{npz}", "--mass", "bytes"], "--mass 'bytes'"),
        (["trace", "info", "{junk}"], "cannot tell the format"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(capsys, tmp_path, npz, args, match):
    import re

    counts = tmp_path / "c.json"
    counts.write_text("[[1, 2], [2, 1]]")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01")
    before = {p.name for p in tmp_path.iterdir()}
    subs = {
        "missing": tmp_path / "nope.npz",
        "npz": npz,
        "out": tmp_path / "out.zarr",
        "counts": counts,
        "tmp": tmp_path,
        "junk": junk,
    }
    code, out, err = run(capsys, *[a.format(**subs) for a in args])
    assert code == 2, (out, err)
    assert re.search(match, err), err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert {p.name for p in tmp_path.iterdir()} == before


def test_existing_output_needs_overwrite(capsys, npz, tmp_path):
    out = tmp_path / "o.npz"
    out.write_text("keep me")
    code, _, err = run(capsys, "trace", "convert", npz, out)
    assert code == 2 and "pass --overwrite" in err and out.read_text() == "keep me"
    assert run(capsys, "trace", "convert", npz, out, "--overwrite")[0] == 0
    assert read_input(out).n_tokens == 60


def test_verbose_shows_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "--verbose", "trace", "info", tmp_path / "nope.npz")
    assert code == 2 and "Traceback" in err


def _esft_dir(tmp_path):
    from moescope.imports.esft import write_esft

    write_esft(random_trace(n_tokens=30, n_seq=3, labels=False), tmp_path / "esft")
    return tmp_path / "esft"


def _vllm_npy(tmp_path):
    np.save(tmp_path / "routed.npy", random_trace(labels=False).experts.astype(np.int32))
    return tmp_path / "routed.npy"


def _sglang_csv(tmp_path):
    (tmp_path / "expert_distribution_rank0_timestamp1.csv").write_text("layer,expert,count\n0,1,5\n")
    return tmp_path / "expert_distribution_rank0_timestamp1.csv"


@pytest.mark.parametrize(
    ("make", "args", "match"),
    [
        (_esft_dir, ["--from", "esft", "--n-experts", "8"], "--top-k"),
        (_esft_dir, ["--from", "esft", "--top-k", "2", "--n-experts", "4"], "expert id"),
        (_vllm_npy, ["--from", "vllm"], "--n-experts"),
        (_vllm_npy, ["--from", "vllm", "--n-experts", "8", "--moe-layers", "5"], "out of range"),
        (_sglang_csv, ["--from", "sglang-csv", "--n-experts", "8"], "header"),
    ],
)
def test_import_errors_exit_2(capsys, tmp_path, make, args, match):
    src = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(capsys, "trace", "convert", src, tmp_path / "out.zarr", *args)
    assert code == 2 and match in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_import_esft_and_vllm_via_cli(capsys, tmp_path):
    src = _esft_dir(tmp_path)
    code, _, _ = run(capsys, "trace", "convert", src, tmp_path / "e.zarr", "--top-k", "2", "--n-experts", "8")
    assert code == 0 and read_input(tmp_path / "e.zarr").n_sequences == 3
    code, _, _ = run(capsys, "trace", "convert", _vllm_npy(tmp_path), tmp_path / "v.npz", "--n-experts", "8")
    assert code == 0 and read_input(tmp_path / "v.npz").weights is None


def test_synth_zarr_equals_npz_and_truth_stored(capsys, tmp_path):
    args = [
        "--tokens",
        "3000",
        "--layers",
        "3",
        "--experts",
        "16",
        "--top-k",
        "2",
        "--teams",
        "2",
        "--team-strength",
        "0.5",
        "--domains",
        "a,b",
        "--zipf",
        "0.5,1,1.5",
        "--seed",
        "7",
    ]
    assert run(capsys, "trace", "synth", tmp_path / "s.zarr", *args)[0] == 0
    assert run(capsys, "trace", "synth", tmp_path / "s.npz", *args)[0] == 0
    a, b = read_input(tmp_path / "s.zarr"), read_input(tmp_path / "s.npz")
    assert a.equals(b) and a.n_tokens == 3000 and a.labels() and set(a.labels()) <= {"a", "b"}
    assert len(a.meta.extra["synth"]["truth"]["teams"]) == 3


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--top-k", "20", "--experts", "8"], "top_k is 20"),
        (["--zipf", "x"], "--zipf 'x'"),
        (["--zipf", "1,2", "--layers", "3"], "one per layer"),
        (["--stickiness", "1.5"], "stickiness is 1.5"),
    ],
)
def test_synth_bad_spec_exits_2(capsys, tmp_path, args, match):
    code, _, err = run(capsys, "trace", "synth", tmp_path / "s.zarr", "--tokens", "100", *args)
    assert code == 2 and match in err, err
    assert list(tmp_path.iterdir()) == []


def test_global_flags_after_the_command(capsys, npz):
    """`-q` / `-v` work anywhere before `--`, as the README says (click alone reads them only up front)."""
    from moescope.cli import hoist_global_flags

    assert hoist_global_flags(["cache", "x.zarr", "-q", "--", "-v"]) == ["-q", "cache", "x.zarr", "--", "-v"]
    code, out, err = run(capsys, "concentration", npz, "-q", "--json")
    assert code == 0, err
    assert json.loads(out)["layers"]
    code, _, err = run(capsys, "trace", "info", npz.with_name("missing.npz"), "--verbose")
    assert code == 2 and "Traceback" in err


@pytest.mark.parametrize("command", [("concentration",), ("cache",), ("capture", "llama"), ("compare",)])
def test_help_shows_flags_and_arguments_plainly(capsys, command):
    """Flags show no value type and arguments their name in capitals (typer 0.25+ printed <bool>, {src})."""
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert "<bool>" not in out and not re.search(r"\{[a-z_]+\}", out.split("\n\n")[0] + out[:300])
    assert re.search(r"Usage: moescope [a-z ]+ \[OPTIONS\] [A-Z]", out)


def test_mass_counts_a_trace_too(capsys, npz, tmp_path):
    """--mass is one definition: what counts files are read as, and what a trace is counted as."""
    trace = read_input(npz)
    code, _, err = run(capsys, "trace", "convert", npz, tmp_path / "g.json", "--mass", "gate")
    assert code == 0, err
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["mass"] == "gate"
    np.testing.assert_allclose(doc["layers"], trace.counts("gate").values)
    code, out, _ = run(capsys, "trace", "convert", "--help")
    assert code == 0 and "For counts sources" not in out and "trace is counted as" in " ".join(out.split())
