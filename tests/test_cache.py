"""The expert-cache simulator: every policy against its naive reference, shared contract tests over the
registry, libCacheSim agreement for k = 1, the train/test split, curves, budget allocation, cost model, CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

import reference
import reference_adaptive
import reference_learned
import reference_queue
from conftest import random_trace, run, same_json
from moescope import fixture
from moescope.cache import (
    POLICIES,
    Hardware,
    PolicyParams,
    Stream,
    allocate,
    build_streams,
    make_policy,
    miss_curves,
    project_decode,
    simulate,
)
from moescope.cache import kernels as K
from moescope.cache import kernels_learned as KL
from moescope.cache.policies import DEFAULT_POLICIES
from moescope.errors import UsageError
from moescope.imports import read_input, write_output
from moescope.trace import RoutingTrace


def _stream(seed: int, n_items: int | None = None, k: int | None = None, groups: int | None = None):
    """A small stream with locality (repeated sets) and random resets."""
    rng = np.random.default_rng(seed)
    e = n_items or int(rng.integers(3, 10))
    k = k or int(rng.integers(1, min(4, e) + 1))
    g_n = groups or int(rng.integers(1, 80))
    req = np.argsort(rng.random((g_n, e)), axis=1)[:, :k].astype(np.int32)
    for g in range(1, g_n):
        if rng.random() < 0.4:
            req[g] = req[g - 1][rng.permutation(k)]
    reset = np.zeros(g_n, dtype=bool)
    reset[0] = True
    reset[rng.random(g_n) < 0.1] = True
    # gate weights (their own random stream): continuous, so that no two items' weighted sums tie unless both
    # are 0, a tenth of them 0 (a use that counts nothing)
    w_rng = np.random.default_rng([seed, 8])
    weights = np.where(w_rng.random(req.shape) < 0.1, 0.0, w_rng.uniform(0.05, 1.0, req.shape))
    return Stream(req, reset, e, e, _near(req, e, seed), weights.astype(np.float32)), rng


def _near(req: np.ndarray, e: int, seed: int, m: int = 2) -> np.ndarray:
    """Router near misses for a test stream: up to `m` items per group that it does not request, -1 padded
    (its own random stream, so the request stream's generator is unchanged)."""
    rng = np.random.default_rng([seed, 7])
    near = np.full((req.shape[0], m), -1, dtype=np.int32)
    for g, row in enumerate(req):
        rest = np.setdiff1d(np.arange(e), row)
        pick = rng.permutation(rest)[: int(rng.integers(0, m + 1))]
        near[g, : pick.size] = pick
    return near


def _prefix(s: Stream, g: int) -> Stream:
    near, w = (None if a is None else a[:g] for a in (s.near, s.weights))
    return Stream(s.req[:g], s.reset[:g], s.n_items, s.n_experts, near, w)


def _reference(name: str, s: Stream, capacity: int, policy) -> tuple[int, ...]:
    if name == "lru":
        return reference.cache_lru(s.req, s.reset, capacity)
    if name == "fifo":
        return reference.cache_fifo(s.req, s.reset, capacity)
    if name == "lfu":
        return reference.cache_lfu(s.req, s.reset, capacity, policy.params.aging)
    if name == "lfu-static":
        return reference.cache_static(s.req, s.reset, set(policy._order[:capacity].tolist()))
    if name == "arc":
        return reference.cache_arc(s.req, s.reset, capacity)
    if name == "coact-prefetch":
        return reference.cache_coact_prefetch(
            s.req, s.reset, capacity, policy._coact, s.n_experts, policy.params.prefetch
        )
    if name == "belady":
        return reference.cache_belady(s.req, s.reset, capacity)
    if name == "lrfu":
        return reference.cache_lrfu(s.req, s.reset, capacity, policy.rate(capacity))
    if name == "gate-lrfu":
        return reference.cache_lrfu(s.req, s.reset, capacity, policy.rate(capacity), s.weights)
    if name == "lirs":
        return reference_adaptive.cache_lirs(s.req, s.reset, capacity)
    if name == "w-tinylfu":
        return reference_adaptive.cache_wtinylfu(s.req, s.reset, capacity)
    if name == "lecar":
        return reference_adaptive.cache_lecar(s.req, s.reset, capacity, policy.seed)
    if name == "cacheus":
        return reference_adaptive.cache_cacheus(s.req, s.reset, capacity, policy.seed)
    if name in reference_queue.REFERENCES:
        return reference_queue.REFERENCES[name](s.req, s.reset, capacity)
    if name in ("learned", "learned-near"):
        near = s.near if name == "learned-near" else None
        m = policy.model
        return reference_learned.cache_learned(
            s.req, s.reset, capacity, KL.RATES.tolist(), m.coef.tolist(), near, m.a.tolist(), m.b.tolist(),
            m.horizon, KL.ONLINE_REFIT,
        )  # fmt: skip
    if name == "adaptive-lrfu":
        rates, decay = policy._args()
        return reference.cache_adaptive_lrfu(s.req, s.reset, capacity, list(rates), decay)
    raise AssertionError(f"policy {name!r} has no naive reference in tests/reference.py: add one")


@pytest.mark.kernels
@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("seed", range(12))
def test_policy_matches_reference(name, seed):
    s, rng = _stream(seed)
    params = PolicyParams(aging=int(rng.integers(0, 4)), prefetch=int(rng.integers(0, 4)))
    policy = make_policy(name, params)
    if policy.learns:
        train, _ = _stream(seed + 1000, n_items=s.n_items, k=s.k)
        policy.fit(train)
    for capacity in range(s.k, s.n_items + 1):
        got = tuple(int(v) for v in policy.run(s, capacity))
        assert got == _reference(name, s, capacity, policy), (name, seed, capacity)


@pytest.mark.kernels
@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("seed", range(6))
def test_policy_contract(name, seed):
    """Invariants every policy keeps: hits + misses = accesses; a cache holding everything loads each used
    item once per segment (by a miss or a useful prefetch: cold misses counted alike for all, a static set
    included); Belady is a floor for every policy that loads each miss and prefetches nothing."""
    s, _ = _stream(seed, groups=60)
    policy = make_policy(name, PolicyParams(prefetch=2))
    if policy.learns:
        policy.fit(s)
    cold = sum(len({x for row in seg for x in row}) for seg in reference._segments(s.req, s.reset))
    for capacity in range(s.k, s.n_items + 1):
        hits, misses, loads, wasted = policy.run(s, capacity).tolist()
        assert hits + misses == s.req.size and min(hits, misses, loads, wasted) >= 0
        assert wasted <= loads and (loads == 0 or policy.prefetches)
        if not policy.prefetches and not policy.bypass:
            assert misses >= K.scan_policy(s.req, s.reset, s.n_items, capacity, K.SCAN_BELADY, 0)[1]
        if capacity == s.n_items:  # nothing is ever evicted: each used item enters once per segment
            assert misses + loads - wasted == cold


@pytest.mark.kernels
@pytest.mark.parametrize("seed", range(10))
def test_lru_depths_give_every_capacity(seed):
    s, _ = _stream(seed)
    hist = K.lru_depths(s.req, s.reset, s.n_items)
    assert hist.sum() == s.req.size
    beyond = np.cumsum(hist[::-1])[::-1]
    for capacity in range(s.k, s.n_items + 1):
        assert beyond[capacity] == K.lru(s.req, s.reset, s.n_items, capacity)[1]


@pytest.mark.kernels
@pytest.mark.parametrize("seed", range(40))
def test_belady_depths_give_every_capacity(seed):
    """One pass of Belady's stack depths gives, at every capacity >= k, the misses of the Belady replay at that
    capacity (the kernel and the naive reference), resets included."""
    s, _ = _stream(seed, groups=None if seed < 30 else 300)
    hist = K.belady_depths(s.req, s.reset, s.n_items)
    assert hist.sum() == s.req.size
    beyond = np.cumsum(hist[::-1])[::-1]
    for capacity in range(s.k, s.n_items + 1):
        replay = K.scan_policy(s.req, s.reset, s.n_items, capacity, K.SCAN_BELADY, 0)[1]
        assert beyond[capacity] == replay == reference.cache_belady(s.req, s.reset, capacity)[1], capacity


def test_belady_curves_equal_the_replays():
    """`miss_curves` takes Belady from its stack depths: the same misses as `simulate` replaying each capacity,
    under every protocol."""
    trace = random_trace(n_tokens=400, n_layers=3, n_experts=10, k=3, n_seq=9, seed=2)
    for kwargs in ({}, {"reset_per_sequence": True}, {"split": "all"}):
        curves = miss_curves(trace, ["lru", "belady"], **kwargs)
        caps = [int(c) for c in curves.capacities]
        table = simulate(trace, caps, ["lru", "belady"], **kwargs)
        for pi in range(2):
            np.testing.assert_array_equal(curves.misses[pi].T, table.stats[pi, :, :, 1])


def test_prefetch_zero_is_lru_and_stack_policies_are_monotone():
    s, _ = _stream(3, n_items=12, k=3, groups=300)
    pol = make_policy("coact-prefetch", PolicyParams(prefetch=0))
    pol.fit(s)
    for capacity in range(3, 13):
        assert pol.run(s, capacity).tolist() == K.lru(s.req, s.reset, 12, capacity).tolist()
    for name in ("lru", "belady"):
        misses = [make_policy(name).run(s, c)[1] for c in range(3, 13)]
        assert all(a >= b for a, b in itertools.pairwise(misses)), name


def _oracle_general(path, ids: np.ndarray) -> None:
    """libCacheSim's oracleGeneral binary trace: (u32 time, u64 id, u32 size, i64 next access or -1)."""
    nxt = K.next_use(ids.reshape(-1, 1).astype(np.int32), np.r_[True, np.zeros(ids.size - 1, bool)], 1 << 16)[:, 0]
    rec = np.zeros(ids.size, dtype=[("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
    rec["t"], rec["id"], rec["size"] = np.arange(ids.size), ids, 1
    rec["next"] = np.where(nxt == K.NEVER, -1, nxt)
    rec.tofile(path)


@pytest.mark.parametrize("source", ["zipf", "esft"])
def test_lru_and_belady_agree_with_libcachesim(tmp_path, source, request):
    lcs = pytest.importorskip("libcachesim")
    if source == "esft":
        realdata = request.getfixturevalue("realdata")
        ids = read_input(realdata / "esft-dsv2lite" / "trace.npz").experts[:, 5, :].ravel().astype(np.int64)
    else:
        ids = np.random.default_rng(0).zipf(1.3, 50_000) % 200
    path = tmp_path / "t.oracleGeneral.bin"
    _oracle_general(path, ids)
    req = ids.reshape(-1, 1).astype(np.int32)
    reset = np.r_[True, np.zeros(ids.size - 1, bool)]
    n_items = int(ids.max()) + 1
    for capacity in (2, 8, 32):
        for cls, ours in ((lcs.LRU, "lru"), (lcs.Belady, "belady")):
            reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
            miss_ratio, _ = cls(cache_size=capacity).process_trace(reader)
            misses = make_policy(ours).run(Stream(req, reset, n_items, n_items), capacity)[1]
            assert misses == round(miss_ratio * ids.size), (ours, capacity)


def _halves_trace() -> RoutingTrace:
    """Every sequence uses experts 0-3 in its first half and 4-7 in its second."""
    rows = []
    starts = []
    for _ in range(6):
        starts.append(len(rows))
        rows += [[(t % 2) * 2, (t % 2) * 2 + 1] for t in range(10)]
        rows += [[4 + (t % 2) * 2, 5 + (t % 2) * 2] for t in range(10)]
    experts = np.array(rows, dtype=np.int16)[:, None, :]
    return RoutingTrace(experts, 8, seq_starts=starts)


def test_split_fits_on_first_halves_and_scores_second_halves():
    tr = _halves_trace()
    r = simulate(tr, [4], ["lfu-static", "lru", "belady"])
    rate = dict(zip(r.policies, r.miss_rate()[:, 0], strict=True))
    assert r.tokens == 60 and rate["lfu-static"] == 1.0  # pinned 0-3, the test halves use 4-7 only
    assert rate["lru"] == rate["belady"] == pytest.approx(4 / 120)  # 4 cold misses, then all fits
    r_all = simulate(tr, [4], ["lfu-static"], split="all")
    assert r_all.tokens == 120 and r_all.to_dict()["in_sample"] is True
    reset = simulate(tr, [4], ["lru"], reset_per_sequence=True)
    assert reset.totals()[0, 0, 1] == 6 * 4  # every test half starts cold


def test_pooled_cache():
    tr = random_trace(n_tokens=300, n_layers=3, n_experts=8, k=2, n_seq=5, seed=4)
    (stream,) = build_streams(tr, pooled=True)
    assert stream.n_items == 24 and stream.req.shape == (900, 2)
    assert stream.req[1].tolist() == (tr.experts[0, 1] + 8).tolist()
    r = simulate(tr, [2, 4], ["lru", "belady"], pooled=True, split="all")
    assert r.stats.shape == (2, 2, 1, 4)
    # the pooled cache holds capacity x layers items: the kernel replay at 6 and 12 items
    assert r.stats[0, 0, 0].tolist() == K.lru(stream.req, stream.reset, 24, 6).tolist()
    assert r.stats[1, 1, 0].tolist() == K.scan_policy(stream.req, stream.reset, 24, 12, K.SCAN_BELADY, 0).tolist()
    one = random_trace(n_tokens=200, n_layers=1, n_experts=8, k=2, seed=5)
    a = simulate(one, [3], ["arc"], pooled=True, split="all").stats
    b = simulate(one, [3], ["arc"], split="all").stats
    assert a.tolist() == b.tolist()


def test_simulate_refuses_bad_input():
    tr = random_trace(n_tokens=100, n_layers=2, n_experts=8, k=2)
    with pytest.raises(UsageError, match="below top-k = 2"):
        simulate(tr, [1], ["lru"])
    with pytest.raises(UsageError, match="unknown"):
        simulate(tr, [4], ["lru", "clairvoyant"])
    with pytest.raises(UsageError, match="split 'half'"):
        simulate(tr, [4], ["lru"], split="half")
    single = RoutingTrace(np.array([[[0, 1]]], dtype=np.int16), 8)
    with pytest.raises(UsageError, match="too short to split"):
        simulate(single, [2], ["lru"])


def test_curves_match_replays():
    tr = random_trace(n_tokens=400, n_layers=2, n_experts=10, k=3, n_seq=4, seed=9)
    curves = miss_curves(tr, ["lru", "belady", "fifo"])
    assert curves.capacities.tolist() == list(range(3, 11))
    table = simulate(tr, curves.capacities.tolist(), ["lru", "belady", "fifo"])
    for pi in range(3):
        assert curves.misses[pi].T.tolist() == table.stats[pi, :, :, 1].tolist()
    assert curves.accesses.tolist() == [table.tokens * 3] * 2


def test_allocation_is_optimal_and_beats_uniform():
    rng = np.random.default_rng(0)
    tr = random_trace(n_tokens=10, n_layers=3, n_experts=6, k=2)
    curves = miss_curves(tr, ["lru"])  # shape only; replace the misses by arbitrary non-convex curves
    caps = curves.capacities
    m = np.sort(rng.integers(0, 100, (3, caps.size)), axis=1)[:, ::-1].copy()
    m[1, 1] = m[1, 0]  # a flat step before a drop: a plain greedy would stall here
    curves = type(curves)(curves.policies, caps, curves.layer_ids, m[None], curves.accesses, curves.tokens, "all")
    for budget in range(6, 19):
        a = allocate(curves, budget)
        best = min(
            sum(m[i, j] for i, j in enumerate(js))
            for js in np.ndindex(*(caps.size,) * 3)
            if sum(caps[j] for j in js) <= budget
        )
        assert a.misses == best and sum(a.capacities) <= budget
        assert a.misses <= a.uniform_misses
    with pytest.raises(UsageError, match="below 6 = top-k"):
        allocate(curves, 5)


def test_cost_model_by_hand():
    hw = Hardware(pcie_gbps=10, gpu_gbps=100, cpu_gbps=20)
    proj = {
        p.name: p
        for p in project_decode(
            expert_bytes=np.array([1e9, 1e9]),
            top_k=2,
            n_experts=4,
            dense_bytes=1e9,
            budget_slots=5,
            cache_hits_per_token=np.array([1.5, 1.0]),
            cache_loads_per_token=np.array([0.5, 1.0]),
            cache_misses_per_token=np.array([0.5, 1.0]),
            hw=hw,
        )
    }
    assert proj["all-cpu"].seconds_per_token == pytest.approx(0.01 + 4 / 20)
    assert proj["static-layers"].seconds_per_token == pytest.approx(0.01 + 2 / 100 + 2 / 20)
    assert proj["expert-cache"].seconds_per_token == pytest.approx(0.01 + 2.5 / 100 + 1.5 / 10)
    # misses on the CPU: compute 0.01 + 0.025 + 1.5/20 = 0.11 < the background copies' 1.5/10 = 0.15
    assert proj["expert-cache, misses on CPU"].seconds_per_token == pytest.approx(0.15)
    assert proj["all-cpu"].tokens_per_second == pytest.approx(1 / 0.21)
    with pytest.raises(UsageError, match="--pcie-gbps"):
        Hardware(pcie_gbps=0)


def test_cli_cache_on_fixture(capsys, tmp_path):
    trace = fixture.FIXTURE_DIR / fixture.TRACE
    gguf = fixture.FIXTURE_DIR / fixture.GGUF
    code, out, err = run(
        capsys, "cache", trace, "--capacity", "2,4,8", "--json", "--curve", "--vram", "1MiB", "--gguf", gguf
    )
    assert code == 0, err
    d = json.loads(out)
    assert {r["policy"] for r in d["table"]["rows"]} == set(DEFAULT_POLICIES) <= set(POLICIES)
    assert "adaptive-lrfu" in POLICIES and "adaptive-lrfu" not in DEFAULT_POLICIES  # run only when named
    assert d["table"]["split"] == "test" and len(d["curves"]["capacities"]) == 16 - 2 + 1
    alloc = d["allocation"]
    assert alloc["budget_slots"] == 1 * 2**20 // 49152 and sum(alloc["capacities"]) <= alloc["budget_slots"]
    names = [p["name"] for p in d["projection"]["placements"]]
    assert names == ["all-cpu", "static-layers", "expert-cache", "expert-cache, misses on CPU"]
    code, out, _ = run(capsys, "cache", trace, "--policy", "lru,belady")
    assert code == 0 and "belady" in out and "vs Belady" in out and "fifo" not in out
    code, out, _ = run(capsys, "cache", "--help")
    assert code == 0 and all(name in out for name in POLICIES)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--capacity", "1"], "below top-k = 2"),
        (["--policy", "lru,mru"], "unknown"),
        (["--vram", "1GiB"], "--vram needs the expert size"),
        (["--slots", "4"], "below 8 = top-k"),
        (["--expert-bytes", "12 parsecs"], "not a size"),
        (["--gguf", "nope.gguf"], "does not exist"),
    ],
)
def test_cli_cache_bad_input(capsys, args, message):
    code, _, err = run(capsys, "cache", fixture.FIXTURE_DIR / fixture.TRACE, *args)
    assert code == 2 and message in err and err.count("\n") == 1


def test_esft_reproduces_the_field_ordering(realdata):
    """LFU-static worst, LRU well above Belady, co-activation prefetch ties LRU on demand misses but moves
    more bytes (prefill, one cache shared across sequences, held-out halves)."""
    tr = read_input(realdata / "esft-dsv2lite" / "trace.npz")
    r = simulate(tr, [8, 16, 32], ["lru", "lfu-static", "coact-prefetch", "belady"])
    rate = r.miss_rate()
    t = r.totals()
    lru, static, coact, belady = range(4)
    for ci in range(3):
        assert rate[static, ci] == rate[:, ci].max()
        assert rate[lru, ci] > rate[belady, ci] + 0.08
        assert abs(rate[coact, ci] - rate[lru, ci]) < 0.01
        assert t[coact, ci, 1] + t[coact, ci, 2] > 1.1 * t[lru, ci, 1]


def test_cut_at_resets_adds_up():
    from moescope.cache.simulate import cut_at_resets

    tr = random_trace(n_tokens=400, n_layers=1, n_experts=8, k=2, n_seq=12, seed=3)
    (stream,) = build_streams(tr, reset_per_sequence=True)
    parts = cut_at_resets(stream, 4)
    assert 1 < len(parts) <= 4 and all(p.reset[0] for p in parts)
    assert sum(p.req.shape[0] for p in parts) == 400
    for name in ("lru", "arc", "belady"):
        whole = make_policy(name).run(stream, 3)
        assert (sum(make_policy(name).run(p, 3) for p in parts) == whole).all()


@pytest.mark.slow
def test_simulate_on_dask_equals_threads():
    pytest.importorskip("distributed")
    tr = random_trace(n_tokens=600, n_layers=2, n_experts=8, k=2, n_seq=10, seed=8)
    for reset in (False, True):
        a = simulate(tr, [2, 4], ["lru", "lfu-static", "coact-prefetch", "belady"], reset_per_sequence=reset)
        b = simulate(
            tr, [2, 4], ["lru", "lfu-static", "coact-prefetch", "belady"], reset_per_sequence=reset, scheduler="local:2"
        )
        assert np.array_equal(a.stats, b.stats)


@pytest.mark.parametrize(
    ("k", "e", "want"), [(2, 8, [3, 4]), (6, 64, [8, 16, 32]), (8, 128, [16, 32, 64]), (2, 16, [3, 4, 8]), (1, 2, [2])]
)
def test_default_capacities_lie_between_k_and_e(k, e, want):
    from moescope.cache import default_capacities

    assert default_capacities(k, e) == want
    assert all(k < c < e for c in want) or want == [e]


def test_cli_defaults_and_rows_below_the_floor_say_why(capsys, tmp_path):
    """Mixtral-sized (E 8, k 2): the CLI picks capacities between k and E, as the report does, and a row
    below Belady carries its reason (a prefetcher); a static set pays its cold misses like the others."""
    from conftest import run
    from moescope.imports import write_output

    tr = random_trace(n_tokens=400, n_layers=2, n_experts=8, k=2, n_seq=4, seed=9)
    write_output(tr, tmp_path / "m.npz")
    code, out, err = run(capsys, "cache", tmp_path / "m.npz", "--json")
    assert code == 0, err
    rows = json.loads(out)["table"]["rows"]
    assert sorted({r["capacity"] for r in rows}) == [3, 4]
    for r in rows:
        if r["gap_to_belady"] is not None and r["gap_to_belady"] < 0:
            assert r["below_floor_because"], r
    full = simulate(tr, [8], ["lfu-static", "lru", "belady"]).miss_rate()[:, 0]
    assert full[0] == full[1] == full[2]  # the whole layer: only cold misses, counted alike
    code, out, _ = run(capsys, "cache", tmp_path / "m.npz", "--capacity", "8", "--policy", "coact-prefetch,belady")
    assert code == 0
    assert "coact-prefetch*" in out  # at C = E it prefetches some experts before their first use
    assert "* below the Belady floor because it prefetches" in " ".join(out.split())


@pytest.mark.kernels
@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("seed", range(4))
def test_misses_per_group_add_up_to_the_replay(name, seed):
    """Per-group demand misses (the decode timeline's input) sum to the replay's misses and, for online
    policies, match the naive reference run on growing prefixes."""
    s, rng = _stream(seed, groups=40)
    policy = make_policy(name, PolicyParams(aging=int(rng.integers(0, 3)), prefetch=1))
    if policy.learns:
        policy.fit(s)
    for capacity in (s.k, s.k + 2, s.n_items):
        per = policy.misses_per_group(s, capacity)
        if policy.prefetches:
            assert per is None
            continue
        assert per.sum() == policy.run(s, capacity)[1] and per.min() >= 0 and per.max() <= s.k
        if policy.offline:  # Belady's choices on a prefix depend on the future it no longer sees
            continue
        for g in (1, 7, 23):  # an online policy's first g groups do not depend on what follows
            prefix = _prefix(s, g)
            assert per[:g].sum() == _reference(name, prefix, capacity, policy)[1]


@pytest.mark.kernels
@pytest.mark.parametrize("name", [n for n, cls in POLICIES.items() if not cls.prefetches and not cls.offline])
@pytest.mark.parametrize("seed", range(4))
def test_misses_per_group_match_the_reference_group_by_group(name, seed):
    """Every group's demand misses, at every capacity, equal what the naive reference adds when its prefix
    grows by that group (an online policy's first g groups do not depend on what follows)."""
    s, rng = _stream(seed, n_items=6 + 2 * seed, groups=50)
    policy = make_policy(name, PolicyParams(aging=int(rng.integers(0, 3))))
    if policy.learns:
        policy.fit(s)
    for capacity in range(s.k, s.n_items + 1):
        prefix_misses = [0] + [
            _reference(name, _prefix(s, g), capacity, policy)[1] for g in range(1, s.req.shape[0] + 1)
        ]
        got = policy.misses_per_group(s, capacity)
        assert got.tolist() == np.diff(prefix_misses).tolist(), (name, seed, capacity)


def test_gap_closed_and_transfers_vs_lru():
    rng = np.random.default_rng(3)
    experts = np.stack([rng.choice(8, 2, replace=False) for _ in range(300)]).astype(np.int16)[:, None, :]
    tr = RoutingTrace(experts, 8)
    r = simulate(tr, [4], ["lru", "fifo", "belady"], split="all")
    rate = dict(zip(r.policies, r.miss_rate()[:, 0], strict=True))
    rows = {row["policy"]: row for row in r.rows()}
    gap = rate["lru"] - rate["belady"]
    assert gap > 0
    assert rows["lru"]["lru_gap_closed"] == 0 and rows["belady"]["lru_gap_closed"] == pytest.approx(1)
    assert rows["fifo"]["lru_gap_closed"] == pytest.approx((rate["lru"] - rate["fifo"]) / gap)
    assert rows["lru"]["transfers_vs_lru"] == 1
    assert rows["belady"]["transfers_vs_lru"] == pytest.approx(rate["belady"] / rate["lru"])
    # without LRU in the run there is nothing to close
    assert all(row["lru_gap_closed"] is None for row in simulate(tr, [4], ["fifo", "belady"]).rows())


def test_labels_protocol_fits_on_some_labels_and_replays_others():
    # sequences labelled "a" use experts 0-3 only, "b" experts 4-7 only
    rows, starts, labels = [], [], []
    for i in range(6):
        starts.append(len(rows))
        base = 0 if i % 2 == 0 else 4
        rows += [[base + (t % 2) * 2, base + (t % 2) * 2 + 1] for t in range(10)]
        labels.append("a" if base == 0 else "b")
    tr = RoutingTrace(np.array(rows, dtype=np.int16)[:, None, :], 8, seq_starts=starts, seq_labels=labels)
    r = simulate(tr, [4], ["lfu-static", "lru"], fit_labels=["a"])
    assert r.split == "labels" and r.fit_labels == ("a",) and r.score_labels == ("b",) and r.tokens == 30
    rate = dict(zip(r.policies, r.miss_rate()[:, 0], strict=True))
    assert rate["lfu-static"] == 1.0  # pinned a's experts 0-3; b uses 4-7
    assert rate["lru"] == pytest.approx(4 / 60)
    d = r.to_dict()
    assert d["fit_labels"] == ["a"] and d["score_labels"] == ["b"] and d["split"] == "labels"
    c = miss_curves(tr, ["lru"], score_labels=["a"])
    assert c.split == "labels"
    with pytest.raises(UsageError, match="two protocols"):
        simulate(tr, [4], ["lru"], split="all", fit_labels=["a"])
    with pytest.raises(UsageError, match="not in this trace"):
        simulate(tr, [4], ["lru"], score_labels=["zz"])


def test_cli_cache_score_labels(tmp_path, capsys):
    tr = _halves_trace()
    write_output(tr.replace(seq_labels=["x", "y", "z"] * 2), tmp_path / "l.npz")
    code, out, _ = run(capsys, "cache", tmp_path / "l.npz", "--capacity", "4", "--score-labels", "z")
    flat = " ".join(out.split())
    assert code == 0 and "fitted on x+y sequences, scored on z" in flat and "gap closed" in flat
    code, out, _ = run(capsys, "cache", tmp_path / "l.npz", "--capacity", "4", "--fit-labels", "x", "--json")
    d = json.loads(out)["table"]
    assert code == 0 and d["score_labels"] == ["y", "z"] and d["rows"][0]["transfers_vs_lru"] is not None


@pytest.mark.kernels
@pytest.mark.parametrize("seed", range(8))
def test_lrfu_kernel_matches_reference_at_every_rate(seed):
    from moescope.cache.policies import LRFU_GRID

    s, _ = _stream(seed, groups=70)
    for lam in LRFU_GRID:
        for capacity in range(s.k, s.n_items + 1):
            got = tuple(int(v) for v in K.lrfu(s.req, s.reset, s.n_items, capacity, lam))
            assert got == reference.cache_lrfu(s.req, s.reset, capacity, lam), (seed, lam, capacity)
            per = np.zeros(s.req.shape[0], dtype=np.int64)
            K._lrfu(s.req, s.reset, s.n_items, capacity, lam, K.NO_WEIGHTS, per)
            assert per.sum() == got[1]
            with np.errstate(divide="ignore"):
                lw = np.log2(s.weights.astype(np.float64))
            got = tuple(int(v) for v in K.gate_lrfu(s.req, s.reset, s.n_items, capacity, lam, lw))
            assert got == reference.cache_lrfu(s.req, s.reset, capacity, lam, s.weights), (seed, lam, capacity)


def test_lrfu_rate_is_chosen_on_the_train_stream_only():
    from moescope.cache.policies import LRFU_GRID

    s, _ = _stream(5, n_items=9, k=2, groups=300)
    other, _ = _stream(6, n_items=9, k=2, groups=300)
    pol = make_policy("lrfu")
    pol.fit(s)
    for capacity in (3, 5):
        misses = [K.lrfu(s.req, s.reset, 9, capacity, lam)[1] for lam in LRFU_GRID]
        assert pol.rate(capacity) == LRFU_GRID[int(np.argmin(misses))]
        before = pol.rate(capacity)
        pol.run(other, capacity)  # replaying another stream does not move the fitted rate
        assert pol.rate(capacity) == before


@pytest.mark.kernels
@pytest.mark.parametrize("seed", range(6))
def test_adaptive_lrfu_follows_the_leading_rate(seed):
    """With one rate it is that rate's LRFU; with a fast-forgetting score the kernel still matches the
    reference (the leader changes often)."""
    s, _ = _stream(seed, groups=70)
    for capacity in range(s.k, s.n_items + 1):
        for lam in (0.0, 0.25):
            one = K.adaptive_lrfu(s.req, s.reset, s.n_items, capacity, np.array([lam]), 0.5)
            assert one.tolist() == K.lrfu(s.req, s.reset, s.n_items, capacity, lam).tolist()
        rates = np.array([0.0, 0.0625, 1.0])
        got = tuple(int(v) for v in K.adaptive_lrfu(s.req, s.reset, s.n_items, capacity, rates, 0.5))
        assert got == reference.cache_adaptive_lrfu(s.req, s.reset, capacity, list(rates), 0.5)


def test_layer_streams_are_built_on_access():
    tr = random_trace(n_tokens=50, n_layers=3, n_experts=8, k=2, seed=1)
    streams = build_streams(tr, reset_per_sequence=True)
    assert len(streams) == 3 and len(streams[:2]) == 2
    for i in (0, 2, -1):
        s = streams[i]
        assert s.req.dtype == np.int32 and s.req.flags.c_contiguous
        assert np.array_equal(s.req, tr.experts[:, i, :]) and s.n_items == 8
    assert streams[0] is not streams[0]  # nothing kept between accesses
    with pytest.raises(IndexError):
        streams[3]
    assert [s.req.shape for s in streams] == [(50, 2)] * 3


@pytest.mark.kernels
@pytest.mark.parametrize("with_near", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_learned_fit_rows_match_reference(seed, with_near):
    """The fit rows: features of every item seen in the segment at every `every`-th group (with the near-miss
    CRF last), labelled with log2 of the groups to its next use (the horizon when none), as a naive
    recomputation gives them."""
    s, rng = _stream(seed, groups=120)
    every = int(rng.integers(1, 5))
    rows = (-(-s.req.shape[0] // every)) * s.n_items
    near = s.near if with_near else np.empty((s.req.shape[0], 0), dtype=np.int32)
    x, y = np.empty((rows, KL.N_COEF + int(with_near))), np.empty(rows)
    n = KL.samples(s.req, s.reset, s.n_items, KL.RATES, near, every, 999, x, y)
    want_x, want_y = reference_learned.learned_samples(
        s.req, s.reset, s.n_items, KL.RATES.tolist(), every, 999, near if near.shape[1] else None
    )
    assert n == len(want_y)
    # rows come in the same order (group, then item id)
    np.testing.assert_allclose(x[:n], want_x, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(y[:n], want_y, rtol=1e-12)


def test_learned_fit_is_least_squares_on_train_and_falls_back_to_recency():
    from moescope.cache.policies_learned import TRAIN_WEIGHT, fit_model

    s, _ = _stream(5, n_items=12, k=3, groups=400)
    model = fit_model(s)
    rows = 400 * 12
    x, y = np.empty((rows, KL.N_COEF)), np.empty(rows)
    n = KL.samples(s.req, s.reset, s.n_items, KL.RATES, np.empty((400, 0), np.int32), 1, 400, x, y)
    np.testing.assert_allclose(model.coef, np.linalg.lstsq(x[:n], y[:n], rcond=None)[0])
    np.testing.assert_allclose(model.a, TRAIN_WEIGHT * x[:n].T @ x[:n])
    np.testing.assert_allclose(model.b, TRAIN_WEIGHT * x[:n].T @ y[:n])
    assert model.horizon == 400
    one = Stream(s.req[:1], s.reset[:1], 12, 12)  # no item was seen before a sampled group: no rows
    np.testing.assert_array_equal(fit_model(one).coef, [0, 1] + [0] * (KL.N_COEF - 2))


@pytest.mark.kernels
def test_learned_solve_and_online_refits():
    """The kernel's solver solves; with refits off the replay uses the train model throughout; online refits
    (every 64 groups) change some replays on streams long enough to refit; both match the reference."""
    changed = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        a = rng.random((6, 6)) + 6 * np.eye(6)
        b = rng.random(6)
        np.testing.assert_allclose(KL.solve(a, b), np.linalg.solve(a, b), rtol=1e-10)
        np.testing.assert_allclose(KL.solve(a, b), reference_learned.solve(a.tolist(), b.tolist()), rtol=1e-12)
        s, _ = _stream(seed, n_items=10, k=2, groups=400)
        pol = make_policy("learned")
        pol.fit(_stream(seed + 50, n_items=10, k=2, groups=300)[0])
        m = pol.model
        no = np.empty((400, 0), np.int32)
        for capacity in (3, 5):
            static = KL.learned(s.req, s.reset, 10, capacity, KL.RATES, m.coef, no, m.a, m.b, m.horizon, 0)
            online = pol.run(s, capacity)
            want = reference_learned.cache_learned(
                s.req, s.reset, capacity, KL.RATES.tolist(), m.coef.tolist(), None, m.a.tolist(), m.b.tolist(),
                m.horizon, 0,
            )  # fmt: skip
            assert tuple(static.tolist()) == want
            assert tuple(online.tolist()) == _reference("learned", s, capacity, pol)
            changed += static.tolist() != online.tolist()
    assert changed > 0


def test_near_misses_drop_the_chosen_and_padding():
    from moescope.cache.simulate import near_misses

    req = np.array([[0, 1], [2, 3]], dtype=np.int32)
    cand = np.array([[1, 0, 4, 5], [3, -1, 2, 6]], dtype=np.int16)
    np.testing.assert_array_equal(near_misses(req, cand), [[-1, -1, 4, 5], [-1, -1, -1, 6]])
    trace = read_input(fixture.FIXTURE_DIR / fixture.TRACE)  # it has candidates
    assert build_streams(trace)[0].near is None  # built only when a policy reads them
    want = near_misses(build_streams(trace)[0].req, trace.extras["candidates"][:, 0])
    np.testing.assert_array_equal(build_streams(trace, near=True)[0].near, want)


def test_a_pooled_stream_carries_near_misses_and_weights_as_item_ids(capsys):
    """One pooled cache (item = layer * E + expert, a token's layers in order) gets each group's near misses
    as pooled item ids and its gate weights, so learned-near and gate-lrfu run pooled too."""
    trace = read_input(fixture.FIXTURE_DIR / fixture.TRACE)
    assert trace.weights is not None and "candidates" in trace.extras
    e, n_lay = trace.n_experts, trace.n_layers
    (pooled,) = build_streams(trace, pooled=True, near=True, weights=True)
    layers = build_streams(trace, near=True, weights=True)
    for t in (0, 7, trace.n_tokens - 1):
        for i in range(n_lay):
            g = t * n_lay + i
            np.testing.assert_array_equal(pooled.req[g], layers[i].req[t] + i * e)
            want = np.where(layers[i].near[t] >= 0, layers[i].near[t] + i * e, -1)
            np.testing.assert_array_equal(pooled.near[g], want)
            np.testing.assert_array_equal(pooled.weights[g], layers[i].weights[t])
    assert build_streams(trace, pooled=True)[0].near is None and build_streams(trace, pooled=True)[0].weights is None
    src = fixture.FIXTURE_DIR / fixture.TRACE
    code, _, err = run(capsys, "cache", src, "--pooled", "--policy", "lru,learned-near,gate-lrfu", "--capacity", "32")
    assert code == 0, err


def test_learned_near_needs_candidates_and_reads_them(capsys, tmp_path):
    """learned-near runs on a trace with the router's candidates (the fixture's), from a store too (read whole:
    layer groups hold ids only); without candidates it exits 2 naming the capture flag; 'all' leaves it out."""
    src = fixture.FIXTURE_DIR / fixture.TRACE
    trace = read_input(src)
    assert "candidates" in trace.extras
    store = write_output(trace, tmp_path / "f.zarr")
    args = ["--capacity", "4,8", "--policy", "lru,learned,learned-near,belady", "--json"]
    got = same_json(capsys, "cache", src, store, *args)
    rows = {(r["policy"], r["capacity"]): r for r in got["table"]["rows"]}
    assert rows["learned-near", 4]["demand_miss_rate"] != rows["learned", 4]["demand_miss_rate"]  # it reads them
    bare = write_output(trace.replace(extras={}), tmp_path / "bare.npz")
    code, _, err = run(capsys, "cache", bare, "--policy", "learned-near")
    assert code == 2 and "--candidates" in err
    code, out, err = run(capsys, "cache", bare, "--policy", "all", "--capacity", "4", "--json")
    assert code == 0, err
    names = {r["policy"] for r in json.loads(out)["table"]["rows"]}
    assert "learned-near" not in names and "learned" in names and len(names) == len(POLICIES) - 2  # nor gate-lrfu


def test_gate_lrfu_needs_weights_and_reads_them(capsys, tmp_path):
    """gate-lrfu counts each use by its gate weight: it runs on a trace with weights, from a store too (read
    whole: layer files hold ids only) with the npz's result, differs from LRFU where weights vary, equals it
    where every weight is 1, and exits 2 naming the fix on a trace without weights; 'all' leaves it out."""
    rng = np.random.default_rng(4)
    trace = random_trace(n_tokens=600, n_layers=2, n_experts=12, k=3, n_seq=6, seed=4)
    trace = trace.replace(weights=rng.uniform(0.01, 1.0, trace.experts.shape).astype(np.float32))
    npz = write_output(trace, tmp_path / "w.npz")
    store = write_output(trace, tmp_path / "w.zarr")
    args = ["--capacity", "4,6", "--policy", "lru,lrfu,gate-lrfu,belady", "--json"]
    rows = same_json(capsys, "cache", npz, store, *args)["table"]["per_layer"]
    assert rows["gate-lrfu"] != rows["lrfu"]  # it reads them
    ones = simulate(trace.replace(weights=np.ones(trace.experts.shape, np.float32)), [4, 6], ["lrfu", "gate-lrfu"])
    np.testing.assert_array_equal(ones.stats[0], ones.stats[1])
    bare = write_output(trace.replace(weights=None), tmp_path / "bare.npz")
    code, _, err = run(capsys, "cache", bare, "--policy", "gate-lrfu")
    assert code == 2 and "no weights" in err and "lrfu" in err
