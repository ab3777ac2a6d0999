"""`trace info`'s description: per-layer rows, and the streamed store path equals the in-memory one."""

from __future__ import annotations

import numpy as np

from conftest import random_trace
from moescope.info import describe_counts, describe_store, describe_trace, layer_rows
from moescope.store import TraceStore, save_trace
from moescope.trace import ExpertCounts


def test_layer_rows_values():
    c = ExpertCounts([[6, 2, 2, 0], [1, 1, 1, 1]], layer_ids=[3, 5])
    rows = layer_rows(c)
    assert rows[0] == {
        "layer": 3,
        "experts_used": 3,
        "top_expert": 0,
        "top_share": 0.6,
        "min_share": 0.0,
        "load_cv": float(np.std([6, 2, 2, 0]) / 2.5),
    }
    assert rows[1]["load_cv"] == 0.0 and rows[1]["experts_used"] == 4


def test_store_description_equals_memory(tmp_path):
    tr = random_trace(n_tokens=300, n_seq=7)
    save_trace(tr, tmp_path / "t.zarr", chunk_tokens=32)
    a, b = describe_trace(tr), describe_store(TraceStore(tmp_path / "t.zarr"))
    assert a["layers_summary"] == b["layers_summary"]
    assert a["sequence_lengths"] == b["sequence_lengths"]
    assert b["complete"] and b["labels"] == a["labels"]


def test_counts_description():
    d = describe_counts(ExpertCounts([[0.5, 0.5]], normalized=True))
    assert d["kind"] == "counts" and d["normalized"] and d["layers_summary"][0]["top_share"] == 0.5
