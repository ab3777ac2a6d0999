"""The demo: runs end to end on the committed fixture trace."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moescope import fixture
from moescope.demo import experts_for_mass, run_demo
from moescope.imports import read_input
from moescope.store import TraceStore


def test_experts_for_mass():
    assert experts_for_mass(np.array([0.5, 0.3, 0.2]), 0.9) == 3
    assert experts_for_mass(np.array([0.5, 0.3, 0.2]), 0.8) == 2
    assert experts_for_mass(np.full(4, 0.25), 0.5) == 2


def test_demo_on_fixture(tmp_path):
    result = run_demo(tmp_path / "out")
    source = read_input(fixture.TRACE)
    store = TraceStore(result.outputs["trace"])
    assert store.complete and store.to_trace().equals(source)
    train, test = (read_input(result.outputs[p]) for p in ("train", "test"))
    assert train.n_tokens + test.n_tokens == source.n_tokens
    counts = json.loads(result.outputs["counts"].read_text())
    assert counts["tokens"] == source.n_tokens and len(counts["layers"]) == source.n_layers
    shares = source.counts().shares()
    for i, row in enumerate(result.layers):
        assert row["top_share"] == shares[i].max()
        assert set(row["top_expert_by_label"]) == set(source.labels())


def test_demo_cli_json(tmp_path, capsys):
    from conftest import run

    code, out, _ = run(capsys, "demo", "--out", tmp_path / "d", "--json")
    d = json.loads(out)
    assert code == 0 and d["info"]["n_experts"] == 16
    assert set(d["outputs"]) == {"trace", "train", "test", "counts", "ranking", "report"}
    assert {"concentration", "cache", "offload"} <= set(d["summary"])


def test_demo_runs_the_concentration_gate(tmp_path):
    from moescope.analyze import concentration

    result = run_demo(tmp_path / "out")
    assert result.gate == concentration(read_input(fixture.TRACE).counts())


def test_demo_writes_the_report_and_ranking(tmp_path):
    result = run_demo(tmp_path / "out")
    html = result.outputs["report"].read_text()
    assert "Is a per-expert cache worth building?" in html and "llama.cpp offload plan" in html
    assert result.outputs["ranking"].read_text().startswith("layer,expert,rank,count,gate_mass,share")


@pytest.mark.slow
def test_demo_capture_afresh_matches_the_committed_trace(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    result = run_demo(tmp_path / "out", capture=True)
    fresh = read_input(result.outputs["captured"])
    committed = read_input(fixture.TRACE)
    assert fresh.n_tokens == committed.n_tokens
    agree = (np.sort(fresh.experts, axis=2) == np.sort(committed.experts, axis=2)).all(axis=2).mean()
    assert agree > 0.999  # the same model on the same text: the same routing (float near-ties aside)
