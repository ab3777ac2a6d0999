"""The moescope .npz format: round trips, task_starts labels, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import random_trace
from moescope.errors import FormatError, TraceError
from moescope.imports import ImportOptions, read_input, write_output
from moescope.imports.npz import read_npz


@pytest.mark.parametrize("extras", [False, True])
def test_roundtrip_npz_zarr_npz(tmp_path, extras):
    tr = random_trace(weights="float16", token_ids=extras, lookahead=2 * extras, candidates=3 * extras)
    write_output(tr, tmp_path / "a.npz")
    a = read_input(tmp_path / "a.npz")
    write_output(a, tmp_path / "b.zarr")
    write_output(read_input(tmp_path / "b.zarr"), tmp_path / "c.npz")
    c = read_input(tmp_path / "c.npz")
    assert c.equals(tr) and a.equals(tr)


def test_realdata_style_file_with_task_starts(tmp_path):
    tr = random_trace(n_tokens=30, n_seq=3, labels=False)
    meta = {
        "model": "m",
        "n_experts": 8,
        "top_k": 2,
        "layer_ids": [1, 2],
        "task_starts": {"b": tr.seq_starts[1].item(), "a": 0},
    }
    np.savez(
        tmp_path / "t.npz",
        experts=tr.experts,
        weights=tr.weights.astype(np.float16),
        seq_starts=tr.seq_starts,
        meta=np.asarray(json.dumps(meta)),
    )
    got = read_input(tmp_path / "t.npz")
    assert got.seq_labels.tolist() == ["a", "b", "b"]
    assert got.meta.model == "m" and "task_starts" not in got.meta.extra
    assert got.layer_ids.tolist() == [1, 2]


def test_model_option_overrides(tmp_path):
    write_output(random_trace(), tmp_path / "a.npz")
    assert read_input(tmp_path / "a.npz", options=ImportOptions(model="other")).meta.model == "other"


def test_phase_of_an_npz_without_one(tmp_path, capsys):
    """A decode trace from elsewhere (no phase in its meta) is labelled with --phase, not silently prefill."""
    from conftest import run

    tr = random_trace(n_tokens=30, n_seq=2, labels=False)
    np.savez(tmp_path / "d.npz", experts=tr.experts, meta=np.asarray(json.dumps({"n_experts": 8})))
    assert read_input(tmp_path / "d.npz").phase == "prefill"
    assert read_input(tmp_path / "d.npz", options=ImportOptions(phase="decode")).phase == "decode"
    code, out, err = run(capsys, "trace", "info", tmp_path / "d.npz", "--phase", "decode", "--json")
    assert code == 0, err
    assert json.loads(out)["phase"] == "decode"
    write_output(tr, tmp_path / "p.npz")  # records prefill
    with pytest.raises(FormatError, match="meta says phase 'prefill'"):
        read_input(tmp_path / "p.npz", options=ImportOptions(phase="decode"))


@pytest.mark.parametrize(
    ("arrays", "match", "exc"),
    [
        ({"weights": np.zeros((2, 1, 2))}, "no 'experts' array", FormatError),
        (
            {"experts": np.array([[[0, 1]]]), "meta": np.asarray("{bad")},
            "'meta' is not valid JSON",
            FormatError,
        ),
        ({"experts": np.array([[[0, 1]]]), "meta": np.asarray("{}")}, "pass --n-experts", FormatError),
        (
            {"experts": np.array([[[0, 5]]]), "meta": np.asarray('{"n_experts": 4}')},
            "expert id 5",
            TraceError,
        ),
        (
            {"experts": np.array([[[0, 1]]]), "meta": np.asarray('{"n_experts": 4, "top_k": 3}')},
            "meta says top_k=3",
            FormatError,
        ),
        (
            {"experts": np.array([[[0, 1]]], dtype=object), "meta": np.asarray('{"n_experts": 4}')},
            "needs unpickling",
            FormatError,
        ),
    ],
)
def test_bad_npz(tmp_path, arrays, match, exc):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    before = path.read_bytes()
    with pytest.raises(exc, match=match):
        read_npz(path, ImportOptions())
    assert path.read_bytes() == before


def test_not_a_zip(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(FormatError, match=r"not a readable \.npz"):
        read_npz(tmp_path / "x.npz", ImportOptions())
