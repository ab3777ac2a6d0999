"""The concentration gate: reference comparison, limits, the published Qwen3 figures, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import reference
from conftest import random_trace
from moescope import fixture
from moescope.analyze import concentration
from moescope.errors import UsageError
from moescope.imports import ImportOptions, read_input
from moescope.synth import SynthSpec, synth_trace
from moescope.trace import ExpertCounts


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 50, size=(4, 12)) * (rng.random((4, 12)) < 0.8)
    values[:, 0] += 1  # no empty layer
    counts = ExpertCounts(values, layer_ids=[3, 5, 7, 9])
    result = concentration(counts, coverage=0.8)
    shares = counts.shares()
    for i, row in enumerate(result.layers):
        ref = shares[i].tolist()
        assert row.layer == [3, 5, 7, 9][i]
        assert row.hot_experts == reference.hot_experts(ref, 0.8)
        assert row.hot_frac_for_coverage == reference.hot_experts(ref, 0.8) / 12
        assert row.concentration_score == pytest.approx(reference.concentration_score(ref), abs=1e-12)
        assert row.gini == pytest.approx(reference.gini(ref), abs=1e-12)
        assert row.top_share == max(ref)


def test_limits_uniform_and_one_expert():
    uniform = concentration(ExpertCounts(np.full((2, 8), 5)))
    assert all(r.hot_experts == 8 and r.concentration_score == pytest.approx(0) for r in uniform.layers)
    assert all(r.gini == pytest.approx(0) for r in uniform.layers)
    assert not uniform.cache_helps and uniform.median_hot_frac == 1.0
    one = concentration(ExpertCounts([[0, 0, 9, 0, 0, 0, 0, 0]]))
    assert one.layers[0].hot_experts == 1 and one.layers[0].concentration_score == pytest.approx(1)
    assert one.layers[0].gini == pytest.approx(7 / 8) and one.cache_helps  # (n - 1) / n for one of n


def test_planted_skew_moves_the_gate():
    flat = synth_trace(SynthSpec(n_tokens=20_000, n_layers=2, n_experts=64, top_k=4, zipf=0.0, seed=1))
    steep = synth_trace(SynthSpec(n_tokens=20_000, n_layers=2, n_experts=64, top_k=4, zipf=2.0, seed=1))
    a, b = concentration(flat.counts()), concentration(steep.counts())
    assert a.median_hot_frac > 0.85 and not a.cache_helps
    assert b.median_hot_frac < 0.25 and b.cache_helps
    assert b.median_concentration > a.median_concentration + 0.2


def test_gate_mass_and_bad_options():
    tr = random_trace()
    assert concentration(tr.counts("gate")).mass == "gate"
    with pytest.raises(UsageError, match=r"--coverage is 1\.5"):
        concentration(tr.counts(), coverage=1.5)
    with pytest.raises(UsageError, match="layer 2 has no routing mass"):
        concentration(ExpertCounts([[1, 2], [0, 0]], layer_ids=[1, 2]))


@pytest.mark.realdata
def test_qwen3_coder_matches_published_narrow_workload_figures(realdata):
    # published for Qwen3-30B-A3B on a narrow workload: ~45% of experts for 90% coverage, concentration ~0.15
    path = realdata / "qwen3-glm-shares" / "counts.Qwen3-Coder-30B-A3B-Instruct.json"
    result = concentration(read_input(path))
    assert 0.40 <= result.median_hot_frac <= 0.50
    assert 0.12 <= result.median_concentration <= 0.20
    assert not result.cache_helps
    gate = concentration(read_input(path, options=ImportOptions(mass="gate")))
    assert gate.mass == "gate" and abs(gate.median_hot_frac - result.median_hot_frac) < 0.1


@pytest.mark.realdata
def test_esft_trace_is_flat(realdata):
    result = concentration(read_input(realdata / "esft-dsv2lite" / "trace.npz").counts())
    assert result.median_hot_frac > 0.7 and not result.cache_helps


def test_cli_on_fixture_trace_and_imatrix(capsys):
    from conftest import run

    code, out, _ = run(capsys, "concentration", fixture.TRACE, "--json", "--mass", "gate")
    d = json.loads(out)
    assert code == 0 and d["mass"] == "gate" and len(d["layers"]) == 4
    code, out, _ = run(capsys, "concentration", fixture.TRACE)
    assert code == 0 and "median hot fraction" in out
    imatrix = fixture.FIXTURE_DIR.parents[3] / "tests" / "data" / "tiny-moe.imatrix.gguf"
    code, out, _ = run(capsys, "concentration", imatrix, "--json")
    assert code == 0 and json.loads(out)["n_experts"] == 16
    code, _, err = run(capsys, "concentration", fixture.TRACE, "--coverage", "0")
    assert code == 2 and "--coverage is 0" in err
