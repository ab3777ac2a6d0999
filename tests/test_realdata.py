"""Real routing data from public models (../shared/realdata): loads, round trips, speeds. Skipped when absent."""

from __future__ import annotations

import numpy as np
import pytest

from moescope.imports import read_input, write_output
from moescope.info import describe_store
from moescope.slicing import split_halves
from moescope.store import TraceStore

pytestmark = pytest.mark.realdata


def test_esft_dsv2lite_trace(realdata, tmp_path):
    tr = read_input(realdata / "esft-dsv2lite" / "trace.npz")
    assert (tr.n_tokens, tr.n_layers, tr.top_k, tr.n_experts) == (25_028, 26, 6, 64)
    assert tr.layer_ids.tolist() == list(range(1, 27))
    assert tr.labels() == ["intent", "law", "summary"]
    assert tr.weights.dtype == np.float16
    write_output(tr, tmp_path / "t.zarr")
    back = read_input(tmp_path / "t.zarr")
    assert back.equals(tr)
    info = describe_store(TraceStore(tmp_path / "t.zarr"))
    assert all(r["experts_used"] == 64 for r in info["layers_summary"])  # README: every expert used
    train, test = split_halves(tr)
    assert train.n_tokens + test.n_tokens == tr.n_tokens and train.n_sequences == tr.n_sequences


@pytest.mark.parametrize("name", ["counts.json", "counts.arxiv.json", "counts.tulu.json"])
def test_olmoe_counts(realdata, name):
    c = read_input(realdata / "olmoe-paper" / name)
    assert c.n_experts == 64 and c.top_k == 8 and c.layer_ids.tolist() == [0, 7, 15]
    assert (c.values.sum(axis=1) == c.values.sum(axis=1)[0]).all()
    assert c.values.sum(axis=1)[0] % 8 == 0


@pytest.mark.parametrize("model", ["GLM-4.5-Air", "Qwen3-235B-A22B-Instruct-2507", "Qwen3-Coder-30B-A3B-Instruct"])
def test_qwen_glm_shares(realdata, model):
    path = realdata / "qwen3-glm-shares" / f"counts.{model}.json"
    c = read_input(path)
    g = read_input(path, options=__import__("moescope").ImportOptions(mass="gate"))
    assert c.normalized and c.n_experts == 128 and g.mass == "gate"
    np.testing.assert_allclose(c.values.sum(axis=1), 1.0, atol=1e-3)
