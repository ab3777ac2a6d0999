"""The demo: runs end to end and measures what the synthetic generator planted."""

from __future__ import annotations

import dataclasses
import json

from moescope.demo import DEMO_SPEC, run_demo
from moescope.imports import read_input
from moescope.store import TraceStore


def test_demo_small(tmp_path):
    spec = dataclasses.replace(DEMO_SPEC, n_tokens=20_000, n_layers=3, zipf=(0.5, 1.0, 1.5))
    calls = []
    result = run_demo(tmp_path / "out", spec, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (20_000, 20_000)
    store = TraceStore(result.outputs["trace"])
    assert store.complete and store.n_tokens == 20_000
    train, test = (read_input(result.outputs[p]) for p in ("train", "test"))
    assert train.n_tokens + test.n_tokens == 20_000
    counts = json.loads(result.outputs["counts"].read_text())
    assert counts["tokens"] == 20_000 and len(counts["layers"]) == 3
    # more skew planted -> more skew measured, and close to the planted expectation
    tops = [r["top_share"] for r in result.layers]
    assert tops == sorted(tops)
    for r in result.layers:
        assert abs(r["top_share"] - r["planted_top_share"]) < 0.2 * r["planted_top_share"]


def test_demo_cli_json(tmp_path, capsys, monkeypatch):
    import moescope.demo as demo_mod
    from test_cli import run

    monkeypatch.setattr(demo_mod, "DEMO_SPEC", dataclasses.replace(DEMO_SPEC, n_tokens=5_000, n_layers=2, zipf=1.0))
    code, out, _ = run(capsys, "demo", "--out", tmp_path / "d", "--json")
    d = json.loads(out)
    assert code == 0 and d["info"]["tokens"] == 5_000 and set(d["outputs"]) == {"trace", "train", "test", "counts"}
