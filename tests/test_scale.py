"""Chunked map-reduce == whole-trace results, in process and on a 2-worker Dask LocalCluster."""

from __future__ import annotations

import dataclasses

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


def _same(a, b) -> None:
    """Equal structures; floats to 1e-12 relative (chunked float sums add in another order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15)
    else:
        assert a == b


def _check_equal_to_whole(res, trace):
    assert np.array_equal(res["counts"].values, trace.counts().values)
    # gate mass is a float sum: equal up to the order of additions (executors agree bit for bit, see below)
    np.testing.assert_allclose(res["gate"].values, trace.counts("gate").values, rtol=1e-12)
    assert res["gate"].mass == "gate" and res["gate"].tokens == trace.n_tokens
    assert res["concentration"] == concentration(trace.counts())
    assert np.array_equal(res["ranking"].order, rank_experts(trace).order)
    assert res["coact"].to_dict() == coactivation(trace).to_dict()
    loc = locality(trace)
    t = res["temporal"]
    # every temporal figure of `moescope locality`, the seeded shuffle included; float sums to 1e-12
    assert len(t.layers) == len(loc.layers) and t.gap_bins == loc.gap_bins and t.widths == loc.widths
    for got, want in zip(t.layers, loc.layers, strict=True):
        _same(got.to_dict(), want.to_dict())
    _same([dataclasses.asdict(r) for r in t.working_set_by_length],
          [dataclasses.asdict(r) for r in loc.working_set_by_length])  # fmt: skip
    _same({k: dataclasses.asdict(v) for k, v in t.summary.items()},
          {k: dataclasses.asdict(loc.summary[k]) for k in t.summary})  # fmt: skip
    assert (t.tokens, t.sequences) == (trace.n_tokens, trace.n_sequences)
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
    # the workers open the store themselves, here through fsspec (as from shared or object storage)
    res = run_chunked(path.resolve().as_uri(), list(ANALYSES), chunk_tokens=500, scheduler="local:2")
    _check_equal_to_whole(res, trace)
    here = run_chunked(path, ["gate"], chunk_tokens=500)  # 12 chunks: an uneven tree of float additions
    assert np.array_equal(here["gate"].values, res["gate"].values)  # the same additions in the same order


def test_tree_sum_in_process_mirrors_the_dask_tree():
    from moescope.scale.mapreduce import TreeSum, tree_sum

    def bracket(a: str, b: str) -> str:  # records the bracketing: the same tree, not just the same sum
        return f"({a}+{b})"

    for n in range(1, 70):
        leaves = [f"p{i}" for i in range(n)]
        acc = TreeSum(bracket)
        for leaf in leaves:
            acc.push(leaf)
        assert acc.total() == tree_sum(leaves, bracket), n
    assert TreeSum().total() == {} and tree_sum([], None) is None


def test_stores_without_gate_weights(tmp_path):
    trace = synth_trace(SynthSpec(n_tokens=400, n_layers=2, n_experts=8, top_k=2, weights_dtype=None))
    path = tmp_path / "nogate.zarr"
    save_trace(trace, path)
    assert "gate" not in run_chunked(path) and "counts" in run_chunked(path)  # default: what applies
    with pytest.raises(UsageError, match="'gate' needs gate weights"):
        run_chunked(path, ["gate"])


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

    from conftest import run

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


# -- a store that a capture is still writing -----------------------------------------------------------------
def _writer(path, trace, chunk_tokens=512):
    from moescope.store import TraceWriter

    return TraceWriter(
        path,
        n_experts=trace.n_experts,
        n_layers=trace.n_layers,
        top_k=trace.top_k,
        layer_ids=trace.layer_ids,
        weights_dtype="float32",
        meta=trace.meta,
        chunk_tokens=chunk_tokens,
        atomic=False,  # as captures write: visible from the start, growing commit by commit
    )


def _append(writer, trace, lo: int, hi: int) -> None:
    """Append tokens lo:hi of `trace` (a block may start inside a sequence and end inside another)."""
    inside = (trace.seq_starts >= lo) & (trace.seq_starts < hi)
    writer.append(
        trace.experts[lo:hi],
        trace.weights[lo:hi],
        seq_starts=trace.seq_starts[inside] - lo,
        labels=trace.seq_labels[inside].tolist(),
    )


def _capture_in_background(path, trace, first: int, block: int, pause: float):
    """A capture stand-in: writes the first `first` tokens now; the returned (unstarted) thread appends the
    rest `block` tokens at a time, `pause` seconds apart, then closes the store."""
    import threading
    import time

    writer = _writer(path, trace, chunk_tokens=256)
    _append(writer, trace, 0, first)

    def capture() -> None:
        for lo in range(first, trace.n_tokens, block):
            time.sleep(pause)
            _append(writer, trace, lo, min(lo + block, trace.n_tokens))
        writer.close()

    return threading.Thread(target=capture)


def test_a_growing_store_is_read_up_to_its_finished_sequences(tmp_path, store):
    from moescope.scale import ChunkedRun, finished_tokens
    from moescope.slicing import select_tokens
    from moescope.store import TraceStore

    _, trace = store
    path = tmp_path / "capture.zarr"
    writer = _writer(path, trace)
    run = ChunkedRun(path, list(ANALYSES), chunk_tokens=300)  # follows the capture, update by update
    with pytest.raises(UsageError, match="no finished sequence"):
        run.results()
    seen = []
    for lo in range(0, trace.n_tokens, 1700):  # blocks that cut sequences and chunks anywhere
        hi = min(lo + 1700, trace.n_tokens)
        _append(writer, trace, lo, hi)
        st = TraceStore(path)
        assert not st.complete and st.n_tokens == hi // 512 * 512  # whole chunks committed, the rest buffered
        done = finished_tokens(st)
        assert done in trace.seq_starts and done <= st.n_tokens  # a sequence boundary, committed
        res = run_chunked(path, list(ANALYSES), chunk_tokens=700)  # a one-off run sees the same prefix
        _check_equal_to_whole(res, select_tokens(trace, 0, done))
        cut = run_chunked(path, ["counts"], include_open=True)["counts"]  # the open sequence as committed so far
        assert cut.tokens == st.n_tokens
        assert np.array_equal(cut.values, select_tokens(trace, 0, st.n_tokens).counts().values)
        run.update()
        seen.append(run.tokens)
        assert run.tokens == done and run.results(one_pass_only=True)["counts"].tokens == done
    writer.close()
    run.update()
    assert run.complete and run.tokens == trace.n_tokens and len(set(seen)) > 2
    _check_equal_to_whole(run.results(), trace)  # the sum of the updates == one run over the whole trace


@pytest.mark.slow
def test_a_dask_cluster_reads_while_the_capture_appends(tmp_path, store):
    """The writer appends in another thread while a 2-worker cluster maps the committed sequences."""
    pytest.importorskip("distributed")
    import time

    from moescope.scale import ChunkedRun

    _, trace = store
    path = tmp_path / "capture.zarr"
    thread = _capture_in_background(path, trace, first=300, block=400, pause=0.15)
    updates = []
    with ChunkedRun(path, list(ANALYSES), chunk_tokens=500, scheduler="local:2") as run:
        thread.start()
        while not run.complete:
            updates.append(run.update())
            time.sleep(0.1)
        thread.join()
        assert sum(updates) == trace.n_tokens and sum(1 for u in updates if u) >= 2  # it read while writing
        _check_equal_to_whole(run.results(), trace)


def test_cli_follows_a_capture(tmp_path, store, capsys):
    import json

    from conftest import run
    from moescope.slicing import select_tokens

    _, trace = store
    path = tmp_path / "capture.zarr"
    thread = _capture_in_background(path, trace, first=1000, block=1000, pause=0.3)
    thread.start()
    args = ("--follow", "--interval", "0.1", "--only", "counts,prefetch", "--json")
    code, out, err = run(capsys, "analyze", path, *args)
    thread.join()
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) >= 3
    for d in lines[:-1]:  # while writing: finished sequences only, prefetch held back
        n = d["store"]["tokens_analysed"]
        assert not d["store"]["store_complete"] and d["store"]["store_writing"]
        assert "prefetch" not in d and n in trace.seq_starts
        assert d["counts"]["values"] == select_tokens(trace, 0, n).counts().values.tolist()
    last = lines[-1]
    assert last["store"] == {
        "tokens_analysed": 6000,
        "tokens_committed": 6000,
        "store_complete": True,
        "store_writing": False,
    }
    assert "prefetch" in last and last["counts"]["tokens"] == trace.n_tokens
    code, _, err = run(capsys, "analyze", path, "--follow", "--include-open")
    assert code == 2 and "--include-open" in err


def test_a_store_behind_an_fsspec_url(store, tmp_path):
    """Shared or object storage: the same store read through fsspec (file:// here; s3:// etc. alike)."""
    import importlib.util

    from moescope.errors import FormatError, MissingDependencyError
    from moescope.store import TraceStore

    path, trace = store
    url = path.resolve().as_uri()
    assert url.startswith("file://")
    res = run_chunked(url, ["counts", "coact"], chunk_tokens=700)
    assert np.array_equal(res["counts"].values, trace.counts().values)
    assert res["coact"].to_dict() == coactivation(trace).to_dict()
    assert TraceStore(url).to_trace().equals(trace, check_meta=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="not a moescope trace store"):
        TraceStore((tmp_path / "empty").as_uri())
    with pytest.raises(UsageError, match="not a URL fsspec can open"):
        TraceStore("nosuchprotocol://bucket/run.zarr")
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(MissingDependencyError, match="pip install s3fs"):
            TraceStore("s3://bucket/run.zarr")


def test_follow_stops_on_a_store_whose_writer_is_gone(tmp_path, capsys):
    """A killed capture's store never completes: --follow analyses what was committed and returns."""
    import json

    from conftest import random_trace, run
    from moescope.store import TraceWriter

    path = tmp_path / "killed.zarr"
    tr = random_trace(n_tokens=40, n_seq=4, weights=None, labels=False)
    w = TraceWriter(path, n_layers=tr.n_layers, top_k=tr.top_k, n_experts=tr.n_experts, chunk_tokens=8, atomic=False)
    w.append(tr.experts[:30], seq_starts=tr.seq_starts[tr.seq_starts < 30])
    w.flush()
    del w  # "killed": the lock goes with the process, the store stays incomplete
    code, out, err = run(capsys, "analyze", path, "--follow", "--interval", "0.1", "--only", "counts", "--json")
    assert code == 0, err
    last = json.loads(out.splitlines()[-1])
    assert last["store"]["store_complete"] is False and last["store"]["store_writing"] is False
    assert "stopped without closing it" in err
