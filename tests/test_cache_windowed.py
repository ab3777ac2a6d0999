"""Cache replays a window of tokens at a time (`moescope.cache.windowed`) give what one whole-stream replay gives."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import random_trace, run, same_json
from moescope.cache import PolicyParams, make_policy, simulate
from moescope.cache import kernels as K
from moescope.cache.policies import POLICIES
from moescope.cache.simulate import split_streams
from moescope.cache.streamed import LayerColumns, miss_curves_store, simulate_store
from moescope.cache.windowed import _LayerFile, _stream, _windows, parts, simulate_windows
from moescope.errors import UsageError
from moescope.imports import write_output
from moescope.store import TraceStore, save_trace

WINDOWED = [name for name, cls in POLICIES.items() if cls.windowed]


def _groups(seed: int, n: int, n_items: int, rate: float, power: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random top-3 request groups over ``n_items`` items (uniform draws raised to ``power`` before the
    argsort: > 1 skews them to low ids) and resets at ``rate``, the first group a reset."""
    rng = np.random.default_rng(seed)
    req = np.argsort(rng.random((n, n_items)) ** power, axis=1)[:, :3].astype(np.int32)
    reset = rng.random(n) < rate
    reset[0] = True
    return req, reset


@pytest.fixture
def stored(tmp_path):
    trace = random_trace(n_tokens=600, n_layers=4, n_experts=16, k=3, n_seq=23, seed=5)
    path = save_trace(trace, tmp_path / "t.zarr", chunk_tokens=64)
    return trace, TraceStore(path)


def test_the_default_policies_replay_in_windows():
    from moescope.cache.policies import DEFAULT_POLICIES

    assert set(DEFAULT_POLICIES) <= set(WINDOWED)
    # every policy but learned-near and gate-lrfu (a store's layer files hold no router candidates or weights)
    assert set(POLICIES) - set(WINDOWED) == {"learned-near", "gate-lrfu"}


@pytest.mark.kernels
@pytest.mark.parametrize("name", WINDOWED)
@pytest.mark.parametrize("aging", [0, 5])
def test_a_replayer_fed_windows_counts_as_one_run(name, aging):
    """Cut anywhere (resets inside windows and at their edges), the windows' counts add up to `run`'s."""
    req, reset = _groups(7, 500, 12, 0.03)
    from moescope.cache.policies import Stream

    stream = Stream(req, reset, 12, 12)
    for cap in (3, 5, 12):
        pol = make_policy(name, PolicyParams(aging=aging))
        if pol.learns:
            pol.fit(Stream(req[:200], reset[:200], 12, 12))
        whole = pol.run(stream, cap)
        nu = K.next_use(req, reset, 12)
        for cuts in ([], [1, 2, 3], [50, 51, 199, 250, 499], list(range(0, 500, 37))):
            bounds = [0, *cuts, 500]
            rep = pol.replayer(12, 3, cap)
            for a, b in itertools.pairwise(bounds):
                rep.feed(req[a:b], reset[a:b], a, nu[a:b] if pol.reads_next_use else None)
            np.testing.assert_array_equal(rep.stats(), whole, err_msg=f"{name} C{cap} cuts {cuts}")


@pytest.mark.kernels
@pytest.mark.parametrize("name", [n for n in WINDOWED if POLICIES[n].learns])
def test_a_fitter_fed_windows_fits_as_fit_does(name, monkeypatch):
    """A learner fitted from cut windows of its train stream replays as one fitted on the whole stream."""
    import moescope.cache.policies as P
    import moescope.cache.policies_learned as PL
    from moescope.cache.policies import Stream

    monkeypatch.setattr(P, "LRFU_FIT_GROUPS", 90)  # LRFU's prefix ends inside the stream, inside a window
    monkeypatch.setattr(PL, "FIT_GROUPS", 50)  # the learned fit samples every few groups
    req, reset = _groups(3, 400, 12, 0.02, power=2)
    train, test = Stream(req[:300], reset[:300], 12, 12), Stream(req[300:], reset[300:], 12, 12)
    whole = make_policy(name)
    whole.fit(train)
    for cuts in ([], [7, 8, 89, 90, 91, 299], list(range(0, 300, 41))):
        pol = make_policy(name)
        fit = pol.fitter(12, 3, 300)
        for a, b in itertools.pairwise([0, *cuts, 300]):
            fit.feed(req[a:b], reset[a:b], a)
        fit.finish()
        for cap in (3, 6):
            np.testing.assert_array_equal(pol.run(test, cap), whole.run(test, cap), err_msg=f"{name} cuts {cuts}")


@pytest.mark.kernels
def test_next_use_from_the_last_window_to_the_first_equals_the_whole():
    rng = np.random.default_rng(2)
    req = rng.integers(0, 9, size=(300, 2)).astype(np.int32)
    reset = rng.random(300) < 0.05
    reset[0] = True
    whole = K.next_use(req, reset, 9)
    last, out = np.full(9, K.NEVER, dtype=np.int64), np.empty_like(whole)
    for a in range(280, -1, -20):
        K.next_use_into(req[a : a + 20], reset[a : a + 20], a, last, out[a : a + 20])
    np.testing.assert_array_equal(out, whole)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"reset_per_sequence": True},
        {"split": "all"},
        {"split": "all", "reset_per_sequence": True},
        {"fit_labels": ["law", "code"], "score_labels": ["chat"]},
        {"score_labels": ["law"], "reset_per_sequence": True},
    ],
)
def test_windows_rebuild_the_streams_of_every_split(stored, kwargs, tmp_path):
    """The windows of a part, concatenated, are the stream `simulate` replays: same ids and reset flags."""
    trace, store = stored
    per_seq = kwargs.get("reset_per_sequence", False)
    train_s, test_s, tokens = split_streams(
        trace, kwargs.get("split", "test"), pooled=False, reset_per_sequence=per_seq,
        fit_labels=kwargs.get("fit_labels"), score_labels=kwargs.get("score_labels"),
    )  # fmt: skip
    train_p, test_p, _, _ = parts(store, kwargs.get("split", "test"), kwargs.get("fit_labels"),
                                  kwargs.get("score_labels"), per_seq)  # fmt: skip
    assert test_p.n == tokens
    with LayerColumns(store, [2], folder=tmp_path) as cols:
        layer = _LayerFile(cols.path(2), store.top_k)
        try:
            for part, streams in ((train_p, train_s), (test_p, test_s)):
                for window in (1, 13, 64, 10**6):
                    got = list(_stream(layer, part, _windows(part, store.n_tokens, window)))
                    assert [g0 for g0, _, _ in got] == sorted(g0 for g0, _, _ in got)
                    np.testing.assert_array_equal(np.concatenate([r for _, r, _ in got]), streams[1].req)
                    np.testing.assert_array_equal(np.concatenate([f for _, _, f in got]), streams[1].reset)
        finally:
            layer.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"reset_per_sequence": True},
        {"split": "all"},
        {"fit_labels": ["law", "code"], "score_labels": ["chat"]},
        {"params": PolicyParams(aging=9)},
    ],
)
@pytest.mark.parametrize("window", [1, 50, 10**6])
def test_windowed_store_equals_the_whole_trace(stored, kwargs, window, tmp_path):
    trace, store = stored
    whole = simulate(trace, [3, 5, 9], WINDOWED, **kwargs)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    got = simulate_windows(store, [3, 5, 9], WINDOWED, window=window, folder=scratch, **kwargs)
    np.testing.assert_array_equal(got.stats, whole.stats)
    assert got.rows() == whole.rows() and got.to_dict() == whole.to_dict()
    assert list(scratch.iterdir()) == []  # the layer files and next-use files are removed


def test_windowed_layers_and_progress(stored, tmp_path):
    from moescope.slicing import select_layers

    trace, store = stored
    seen = []
    got = simulate_windows(store, [4], ["lru", "belady"], layers=[3, 1], window=40, workers=1, folder=tmp_path,
                           progress=lambda d, n: seen.append((d, n)))  # fmt: skip
    np.testing.assert_array_equal(got.stats, simulate(select_layers(trace, [3, 1]), [4], ["lru", "belady"]).stats)
    assert got.layer_ids == (3, 1)
    assert seen == [(0, 2), (1, 2), (2, 2)]


def test_bad_requests_fail_as_simulate_does(stored, tmp_path):
    trace, store = stored
    for kwargs in (
        {"split": "halves"},
        {"split": "all", "fit_labels": ["law"]},
        {"fit_labels": ["nope"]},
        {"params": PolicyParams(aging=-1)},
    ):
        with pytest.raises(UsageError) as whole:
            simulate(trace, [4], ["lru"], **kwargs)
        with pytest.raises(UsageError) as windows:
            simulate_windows(store, [4], ["lru"], folder=tmp_path, **kwargs)
        assert str(windows.value) == str(whole.value)
    with pytest.raises(UsageError, match="capacity"):
        simulate_windows(store, [1], ["lru"], folder=tmp_path)
    with pytest.raises(UsageError, match="layer"):
        simulate_windows(store, [4], ["lru"], layers=[9], folder=tmp_path)
    with pytest.raises(ValueError, match="windows"):
        simulate_windows(store, [4], ["lru", "learned-near"], folder=tmp_path)
    one = TraceStore(save_trace(random_trace(n_tokens=3, n_seq=3, labels=False), tmp_path / "short.zarr"))
    with pytest.raises(UsageError, match="too short") as windows:
        simulate_windows(one, [2], ["lru"], folder=tmp_path)
    with pytest.raises(UsageError) as whole:
        simulate(one.to_trace(), [2], ["lru"])
    assert str(windows.value) == str(whole.value)
    with pytest.raises(UsageError, match="labels") as windows:
        simulate_windows(one, [2], ["lru"], fit_labels=["a"], folder=tmp_path)


def test_bad_curve_requests_fail_as_in_memory(stored, tmp_path):
    """The in-memory curves refuse what the windowed ones refuse, with the same message."""
    from moescope.cache import miss_curves
    from moescope.cache.windowed import miss_curves_windows

    trace, store = stored
    for names, params in (([], None), (["lru", "nope"], None), (["lru"], PolicyParams(aging=-1)),
                          (["lru"], PolicyParams(prefetch=-2))):  # fmt: skip
        with pytest.raises(UsageError) as whole:
            miss_curves(trace, names, params=params)
        with pytest.raises(UsageError) as windows:
            miss_curves_windows(store, names, params=params, folder=tmp_path)
        assert str(windows.value) == str(whole.value)


def test_simulate_store_replays_in_windows_only_when_it_can(stored, monkeypatch):
    """Windowed policies, per-layer caches, no Dask and the disk room: windows; otherwise layer groups."""
    import moescope.cache.windowed as windowed

    _, store = stored
    calls = []
    real = windowed.simulate_windows
    monkeypatch.setattr(windowed, "simulate_windows", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    simulate_store(store, [4], ["lru", "belady"])
    simulate_store(store, [4])  # the defaults
    assert len(calls) == 2
    monkeypatch.setattr(POLICIES["arc"], "windowed", False)  # as learned-near is (it needs router candidates)
    simulate_store(store, [4], ["lru", "arc"])
    simulate_store(store, [4], ["lru"], pooled=True)
    monkeypatch.setattr(windowed, "room", lambda *a, **k: False)
    simulate_store(store, [4], ["lru"])
    assert len(calls) == 2
    curves = []
    monkeypatch.setattr(windowed, "room", lambda *a, **k: True)
    real_c = windowed.miss_curves_windows
    monkeypatch.setattr(windowed, "miss_curves_windows", lambda *a, **k: curves.append(a[1]) or real_c(*a, **k))
    miss_curves_store(store, ["lru", "belady"])
    miss_curves_store(store, ["lru", "arc"])
    assert curves == [["lru", "belady"]]


def test_cli_defaults_on_a_store_equal_the_npz(capsys, stored, tmp_path):
    trace, store = stored
    npz = write_output(trace, tmp_path / "t.npz")
    same_json(capsys, "cache", store.path, npz, "--capacity", "4,8", "--json")


@pytest.mark.kernels
def test_lru_depths_fed_windows_equal_the_whole():
    req, reset = _groups(4, 400, 10, 0.04)
    whole = K.lru_depths(req, reset, 10)
    state = K.depths_state(10)
    for a in range(0, 400, 33):
        K.depths_run(req[a : a + 33], reset[a : a + 33], *state)
    np.testing.assert_array_equal(state[0], whole)


@pytest.mark.kernels
def test_belady_depths_fed_windows_equal_the_whole():
    from moescope.cache.simulate import STACK_DEPTHS
    from moescope.cache.windowed import DEPTHS, BeladyDepths

    req, reset = _groups(5, 400, 10, 0.04)
    whole = K.belady_depths(req, reset, 10)
    nu = K.next_use(req, reset, 10)
    for step in (1, 33, 400):
        fed = DEPTHS["belady"](10)
        assert isinstance(fed, BeladyDepths) and set(DEPTHS) == set(STACK_DEPTHS)
        for a in range(0, 400, step):
            fed.feed(req[a : a + step], reset[a : a + step], a, nu[a : a + step])
        np.testing.assert_array_equal(fed.state[0], whole)


@pytest.mark.parametrize(
    "kwargs", [{}, {"reset_per_sequence": True}, {"split": "all"}, {"score_labels": ["chat"]}, {"capacities": [3, 7]}]
)
def test_windowed_curves_equal_the_whole_trace(stored, kwargs, tmp_path):
    from moescope.cache import miss_curves
    from moescope.cache.windowed import miss_curves_windows

    trace, store = stored
    names = ["lru", "lfu-static", "belady"]
    whole = miss_curves(trace, names, **kwargs)
    caps = [int(c) for c in whole.capacities]
    replays = simulate(trace, caps, ["belady"], **{k: v for k, v in kwargs.items() if k != "capacities"})
    np.testing.assert_array_equal(whole.misses[2].T, replays.stats[0, :, :, 1])  # Belady's depths: its replays
    (tmp_path / "scratch").mkdir()
    got = miss_curves_windows(store, names, window=37, folder=tmp_path / "scratch", **kwargs)
    np.testing.assert_array_equal(got.misses, whole.misses)
    np.testing.assert_array_equal(got.accesses, whole.accesses)
    np.testing.assert_array_equal(got.capacities, whole.capacities)
    assert got.to_dict() == whole.to_dict()
    assert list((tmp_path / "scratch").iterdir()) == []


def test_cli_budget_and_curves_on_a_store_equal_the_npz(capsys, stored, tmp_path):
    """--curve and --slots (the budget allocation from LRU's curves) read the store in windows."""
    trace, store = stored
    npz = write_output(trace, tmp_path / "t.npz")
    got = same_json(capsys, "cache", store.path, npz, "--capacity", "4", "--curve", "--slots", "40", "--json")
    assert "allocation" in got and "curves" in got


def test_lrfu_fits_from_the_train_prefix_read_in_windows(stored, tmp_path, monkeypatch):
    """LRFU's fit reads only the train stream's first groups: collected across windows, the same ones."""
    import moescope.cache.policies as P

    trace, store = stored
    monkeypatch.setattr(P, "LRFU_FIT_GROUPS", 50)
    whole = simulate(trace, [3, 4, 6, 9], ["lrfu", "lfu-static"])
    got = simulate_windows(store, [3, 4, 6, 9], ["lrfu", "lfu-static"], window=16, folder=tmp_path)
    np.testing.assert_array_equal(got.stats, whole.stats)
    train, _ = parts(store, "test", None, None, False)[:2]
    assert train.n > 3 * 50  # the prefix spans several windows and stops inside the train stream


@pytest.mark.parametrize("windows", [True, False])
def test_one_decode_serves_the_table_and_the_curves(stored, tmp_path, monkeypatch, windows):
    """Given `columns` covering the layers, the table and the curves read them (windows or layer groups) and
    decode nothing more; columns of other layers are not read."""
    import moescope.cache.streamed as S
    import moescope.cache.windowed as windowed
    from moescope.cache import miss_curves

    trace, store = stored
    if not windows:
        monkeypatch.setattr(windowed, "room", lambda *a, **k: False)
        monkeypatch.setattr(S, "GROUP_BYTES", 1)  # one layer per group: groups read the files
    writes = []
    real = LayerColumns._write
    monkeypatch.setattr(LayerColumns, "_write", lambda self: writes.append(tuple(self.layer_ids)) or real(self))
    with LayerColumns(store, store.layer_ids, folder=tmp_path) as cols:
        table = simulate_store(store, [4, 6], ["lru", "belady"], columns=cols)
        curves = miss_curves_store(store, ["lru", "belady"], columns=cols)
        assert len(writes) == 1
    np.testing.assert_array_equal(table.stats, simulate(trace, [4, 6], ["lru", "belady"]).stats)
    np.testing.assert_array_equal(curves.misses, miss_curves(trace, ["lru", "belady"]).misses)
    with LayerColumns(store, [int(store.layer_ids[0])], folder=tmp_path) as one:
        simulate_store(store, [4], ["lru"], columns=one)  # does not cover every layer: decodes its own
    assert len(writes) == 3


def test_cli_curves_on_a_store_decode_it_once(capsys, stored, monkeypatch):
    _, store = stored
    writes = []
    real = LayerColumns._write
    monkeypatch.setattr(LayerColumns, "_write", lambda self: writes.append(1) or real(self))
    code, _, err = run(capsys, "cache", store.path, "--capacity", "4", "--curve", "--slots", "40", "--json")
    assert code == 0, err
    assert len(writes) == 1
    code, _, err = run(capsys, "cache", store.path, "--capacity", "4", "--json")  # the table alone: one decode
    assert code == 0, err
    assert len(writes) == 2
