"""Chunked map-reduce == whole-trace results, in process and on a 2-worker Dask LocalCluster."""

from __future__ import annotations

import numpy as np
import pytest

from moescope.analyze import coactivation, concentration, locality, rank_experts
from moescope.errors import UsageError
from moescope.scale import ANALYSES, run_chunked, sequence_chunks
from moescope.store import save_trace
from moescope.synth import SynthSpec, synth_trace


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    spec = SynthSpec(
        n_tokens=6000,
        n_layers=3,
        n_experts=16,
        top_k=3,
        seq_len=90,
        n_teams=3,
        team_size=4,
        team_strength=0.6,
        stickiness=0.3,
        domains=("a", "b"),
        seed=5,
        weights_dtype="float32",
    )
    trace = synth_trace(spec)
    path = tmp_path_factory.mktemp("scale") / "t.zarr"
    save_trace(trace, path)
    return path, trace


def test_sequence_chunks_cover_whole_sequences():
    starts = np.array([0, 3, 10, 11, 30])
    ranges = sequence_chunks(starts, 40, 8)
    assert ranges == [(0, 3), (3, 11), (11, 30), (30, 40)]  # whole sequences; 11-30 alone (longer than 8)
    assert sequence_chunks(starts, 40, 1000) == [(0, 40)]
    with pytest.raises(UsageError, match="chunk size 0"):
        sequence_chunks(starts, 40, 0)


def _check_equal_to_whole(res, trace):
    assert np.array_equal(res["counts"].values, trace.counts().values)
    assert res["concentration"] == concentration(trace.counts())
    assert np.array_equal(res["ranking"].order, rank_experts(trace).order)
    assert res["coact"].to_dict() == coactivation(trace).to_dict()
    loc = locality(trace)
    t = res["temporal"]
    for i, row in enumerate(loc.layers):
        assert t.reuse[i] == pytest.approx(row.reuse, abs=1e-12)
        assert t.reuse_shuffled_expected[i] == pytest.approx(row.reuse_shuffled_expected, abs=1e-12)
        assert t.cold_share[i] == pytest.approx(row.cold_share, abs=1e-12)
        assert t.working_set_mean[i] == pytest.approx(row.working_set_mean, abs=1e-12)
    pre, cross = res["prefetch"]
    assert [r.to_dict() for r in pre] == [r.to_dict() for r in loc.prefetch]
    assert [r.to_dict() for r in cross] == [r.to_dict() for r in loc.cross]


def test_chunked_equals_whole(store):
    path, trace = store
    res = run_chunked(path, list(ANALYSES), chunk_tokens=700)
    _check_equal_to_whole(res, trace)
    one = run_chunked(path, ["counts"], chunk_tokens=10**9)
    assert np.array_equal(one["counts"].values, res["counts"].values)


@pytest.mark.slow
def test_dask_local_cluster_equals_in_process(store):
    pytest.importorskip("distributed")
    path, trace = store
    res = run_chunked(path, list(ANALYSES), chunk_tokens=1500, scheduler="local:2")
    _check_equal_to_whole(res, trace)


def test_bad_requests(store):
    path, _ = store
    with pytest.raises(UsageError, match="unknown"):
        run_chunked(path, ["counts", "vibes"])
    with pytest.raises(UsageError, match="expected local:N"):
        run_chunked(path, ["counts"], scheduler="local:two")
    with pytest.raises(UsageError, match=r"layer\(s\) \[9\]"):
        run_chunked(path, ["counts"], layers=[9])


def test_cli_analyze(store, capsys):
    import json

    from test_cli import run

    path, trace = store
    code, out, err = run(capsys, "analyze", path, "--only", "counts,coact,temporal", "--chunk-tokens", "900", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["coact"] == coactivation(trace).to_dict()
    assert d["counts"]["tokens"] == trace.n_tokens
    code, out, _ = run(capsys, "analyze", path, "--only", "prefetch,concentration")
    assert code == 0 and "cross-layer precision" in out and "cache helps" in out
    code, _, err = run(capsys, "analyze", path, "--only", "nope")
    assert code == 2 and "unknown" in err
