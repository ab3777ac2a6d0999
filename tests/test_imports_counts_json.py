"""Counts JSON: both shapes, exact round trips, gate mass, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import random_trace
from moescope.errors import FormatError, TraceError, UsageError
from moescope.imports import ImportOptions, read_input, write_output
from moescope.trace import ExpertCounts


def test_counts_roundtrip_exact(tmp_path):
    c = random_trace().counts()
    write_output(c, tmp_path / "c.json")
    assert read_input(tmp_path / "c.json").equals(c)
    shares = ExpertCounts(
        [[0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]], normalized=True, layer_ids=[4, 9], meta={"model": "x"}
    )
    write_output(shares, tmp_path / "s.json")
    back = read_input(tmp_path / "s.json")
    assert back.equals(shares, check_meta=False) and back.values.dtype == np.float64


def test_trace_to_counts_json(tmp_path):
    tr = random_trace()
    write_output(tr, tmp_path / "c.json")
    got = read_input(tmp_path / "c.json")
    np.testing.assert_array_equal(got.values, tr.counts().values)
    assert got.tokens == tr.n_tokens and got.top_k == tr.top_k


def test_plain_list_of_lists(tmp_path):
    (tmp_path / "p.json").write_text("[[1, 2, 3], [3, 2, 1]]")
    got = read_input(tmp_path / "p.json")
    assert got.values.tolist() == [[1, 2, 3], [3, 2, 1]] and got.n_experts == 3 and got.top_k is None


def test_gate_weighted_table(tmp_path):
    doc = {
        "n_experts": 2,
        "top_k": 1,
        "layers": [[0.5, 0.5]],
        "layers_gate_weighted": [[0.6, 0.4]],
        "normalized": True,
    }
    (tmp_path / "g.json").write_text(json.dumps(doc))
    assert read_input(tmp_path / "g.json", options=ImportOptions(mass="gate")).values.tolist() == [[0.6, 0.4]]
    assert read_input(tmp_path / "g.json").mass == "counts"
    (tmp_path / "n.json").write_text(json.dumps({"layers": [[1, 2]]}))
    with pytest.raises(UsageError, match="needs a 'layers_gate_weighted' table"):
        read_input(tmp_path / "n.json", options=ImportOptions(mass="gate"))


@pytest.mark.parametrize(
    ("text", "exc", "match"),
    [
        ("{oops", FormatError, "not valid JSON"),
        ('{"model": "x"}', FormatError, "expected an object with a 'layers' table"),
        ('{"layers": [1, 2]}', FormatError, "must be a list of per-layer lists"),
        ('{"layers": [[1, "a"]]}', FormatError, "row 0 holds non-numbers such as 'a'"),
        ('{"layers": [[1, -1]]}', TraceError, "expert 1 is -1"),
        ('{"layers": [[1, 2], [1]]}', TraceError, "equal-length rows"),
        ('{"layers": [[0.2, 0.2]], "normalized": true}', TraceError, "sums to 0.4"),
    ],
)
def test_bad_counts(tmp_path, text, exc, match):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(exc, match=match):
        read_input(tmp_path / "bad.json", "counts-json")
