"""Cache replays of a store read in layer groups (`moescope.cache.streamed`) give what the whole trace gives."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_trace, run, same_json
from moescope.cache import miss_curves, simulate
from moescope.cache.streamed import layer_groups, miss_curves_store, simulate_store
from moescope.imports import write_output
from moescope.store import TraceStore, save_trace

POLICIES = ["lru", "lfu-static", "lrfu", "coact-prefetch", "s3-fifo", "belady"]


@pytest.fixture(autouse=True)
def _layer_groups(monkeypatch):
    """These tests are about the layer groups: the replay in windows (`moescope.cache.windowed`, which
    `simulate_store` prefers) is turned off as it is without disk room for it."""
    import moescope.cache.windowed as windowed

    monkeypatch.setattr(windowed, "room", lambda *a, **k: False)


@pytest.fixture
def stored(tmp_path):
    trace = random_trace(n_tokens=400, n_layers=5, n_experts=16, k=2, n_seq=9, seed=3)
    path = save_trace(trace, tmp_path / "t.zarr", chunk_tokens=64)
    return trace, TraceStore(path)


def test_layer_groups_cover_the_layers_in_order_within_the_budget():
    ids = [1, 3, 5, 7, 9]
    per_layer = 1000 * 8 * 2 * 4  # tokens x k x int16 x the four copies counted
    assert layer_groups(ids, 1000, 8, budget=2 * per_layer) == [[1, 3], [5, 7], [9]]
    assert layer_groups(ids, 1000, 8, budget=1) == [[x] for x in ids]  # at least one layer per group
    assert layer_groups(ids, 1000, 8, budget=10**12) == [ids]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"reset_per_sequence": True},
        {"split": "all"},
        {"fit_labels": ["law", "code"], "score_labels": ["chat"]},
        {"pooled": True},
    ],
)
@pytest.mark.parametrize("budget", [1, 3 * 400 * 2 * 2 * 4])  # one layer per group; three
def test_store_in_groups_equals_the_whole_trace(stored, kwargs, budget):
    trace, store = stored
    whole = simulate(trace, [2, 4, 8], POLICIES, **kwargs)
    parts = simulate_store(store, [2, 4, 8], POLICIES, budget=budget, **kwargs)
    assert parts.layer_ids == whole.layer_ids
    np.testing.assert_array_equal(parts.stats, whole.stats)
    assert parts.rows() == whole.rows()


def test_store_layers_and_curves_in_groups(stored):
    trace, store = stored
    from moescope.slicing import select_layers

    sub = select_layers(trace, [3, 1, 4])
    got = simulate_store(store, [4], ["lru", "belady"], layers=[3, 1, 4], budget=1)
    np.testing.assert_array_equal(got.stats, simulate(sub, [4], ["lru", "belady"]).stats)
    assert got.layer_ids == (3, 1, 4)
    whole = miss_curves(trace, ["lru", "lfu", "belady"])
    parts = miss_curves_store(store, ["lru", "lfu", "belady"], budget=1)
    np.testing.assert_array_equal(parts.misses, whole.misses)
    np.testing.assert_array_equal(parts.accesses, whole.accesses)
    assert parts.layer_ids == whole.layer_ids


def test_progress_counts_over_all_groups(stored):
    _, store = stored
    seen = []
    simulate_store(store, [4, 8], ["lru", "belady"], budget=1, progress=lambda d, n: seen.append((d, n)))
    total = 2 * 2 * store.n_layers
    assert {n for _, n in seen} == {total}
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_routing_at_reads_only_the_asked_layers(stored):
    trace, store = stored
    got = store.routing_at([5, 1])  # model layer ids 1..5
    np.testing.assert_array_equal(got.experts, trace.experts[:, [4, 0]])
    np.testing.assert_array_equal(got.seq_starts, trace.seq_starts)
    assert got.labels() == trace.labels() and got.weights is None
    assert got.layer_ids.tolist() == [5, 1]


@pytest.mark.parametrize("room", [True, False])
def test_cli_reads_a_store_in_groups_like_the_npz(capsys, stored, tmp_path, monkeypatch, room):
    """One layer per group: decoded once into layer files (or, without disk room, each group from the store),
    the tables and curves equal the npz's; the layer files are gone afterwards."""
    trace, store = stored
    npz = write_output(trace, tmp_path / "t.npz")
    import moescope.cache.streamed as streamed

    monkeypatch.setattr(streamed, "GROUP_BYTES", 1)  # one layer per group
    monkeypatch.setattr(streamed.LayerColumns, "room", staticmethod(lambda *a, **k: room))
    monkeypatch.setattr(streamed.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    calls = []
    for cls in (TraceStore, streamed.LayerColumns):
        real = cls.routing_at
        monkeypatch.setattr(
            cls,
            "routing_at",
            lambda self, layers, _r=real, _c=cls.__name__: calls.append((_c, list(layers))) or _r(self, layers),
        )
    args = ["--capacity", "4,8", "--policy", "lru,lrfu,belady", "--curve", "--layers", "1-4", "--json"]
    same_json(capsys, "cache", store.path, npz, *args)
    source = "LayerColumns" if room else "TraceStore"
    assert calls == [(source, [x]) for x in (1, 2, 3, 4)] * 2  # the table, then the curves, one layer at a time
    assert list((tmp_path / "tmp").iterdir()) == []  # the layer files were removed
    code, _, err = run(capsys, "cache", store.path, "--layers", "7", "--json")
    assert code == 2 and "not in this trace" in err


def test_layer_columns_read_each_layer_check_ids_and_clean_up(tmp_path, monkeypatch):
    """The decode pass writes one file per layer and checks every span's ids (group traces are then built
    without a second check); the folder is removed on exit and when the pass fails."""
    from moescope.cache.streamed import LayerColumns
    from moescope.errors import MoescopeError

    tr = random_trace(n_tokens=100, n_layers=2, n_experts=8, k=2, seed=1)
    store = TraceStore(save_trace(tr, tmp_path / "b.zarr", chunk_tokens=16))
    with LayerColumns(store, [2, 1], folder=tmp_path) as cols:
        np.testing.assert_array_equal(cols.routing_at([1, 2]).experts, tr.experts)
        assert len(list(tmp_path.glob("moescope-layers-*/*.bin"))) == 2
    assert list(tmp_path.glob("moescope-layers-*")) == []
    real = store.expert_rows
    monkeypatch.setattr(store, "expert_rows", lambda *a: real(*a) + 8)  # ids past E = 8
    with pytest.raises(MoescopeError, match="8"):
        LayerColumns(store, [1, 2], folder=tmp_path)
    assert list(tmp_path.glob("moescope-layers-*")) == []
