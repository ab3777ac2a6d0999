"""The decode timeline: the kernel against a naive event-by-event reference, the closed-form cost model
when overlap and prefetch are off, perfect prediction, monotonicity, prefetches as bandwidth."""

from __future__ import annotations

import numpy as np
import pytest

import reference_timeline
from conftest import random_trace
from moescope.cache import project_decode
from moescope.cache.cost import Hardware
from moescope.cache.policies import Stream, make_policy
from moescope.cache.simulate import build_streams
from moescope.cache.timeline import (
    MACHINES,
    Costs,
    Machine,
    _prefetch_timeline,
    _top_rows,
    _ubatch_lru,
    default_slots,
    demand_cache,
    predictions,
    prefetch_cache,
    prefill_estimate,
    simulate_timeline,
)
from moescope.slicing import select_layers

M = Machine("test", gpu_gbps=900.0, cpu_gbps=60.0, pcie_gbps=25.0, pcie_latency_us=10.0)


def _trace(seed=0, n_layers=4, lookahead=0):
    return random_trace(n_tokens=120, n_layers=n_layers, n_experts=8, k=2, n_seq=3, seed=seed, lookahead=lookahead)


@pytest.mark.kernels
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("overlap", [True, False])
def test_kernel_matches_the_naive_reference(seed, overlap):
    rng = np.random.default_rng(seed)
    tr = _trace(seed)
    pred = predictions(tr, ("oracle", "transition", "cross-layer")[seed % 3], 1 + seed % 2)
    pred[rng.random(pred.shape[:2]) < 0.3] = -1  # some steps predict nothing
    cap = rng.integers(2, 8, tr.n_layers)
    c = Costs.of(np.full(tr.n_layers, 1e6) * rng.uniform(0.5, 2, tr.n_layers), 4e6, M)
    args = (tr.experts, pred, 1 + seed % 2, cap, c.t_gpu, c.t_pcie, c.t_dense, c.latency, overlap)
    got = _prefetch_timeline(*args)
    want = reference_timeline.prefetch_timeline(*args)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_without_overlap_and_prefetch_it_is_the_closed_form_cost_model():
    """No overlap, no latency, no prefetch: the timeline of an LRU cache is `project_decode`'s expert-cache row."""
    tr = _trace(1)
    m = Machine("closed", 900.0, 60.0, 25.0, pcie_latency_us=0.0)
    eb = np.array([1e6, 2e6, 1.5e6, 3e6])
    c = Costs.of(eb, 5e6, m)
    cap = 4
    misses = np.stack([make_policy("lru").misses_per_group(s, cap) for s in build_streams(tr)], axis=1)
    none = np.full((tr.n_tokens, tr.n_layers, 2), -1, dtype=np.int16)
    kernel = prefetch_cache(tr, none, 1, np.full(tr.n_layers, cap), c, m, False, "lru")
    demand = demand_cache(tr, misses, c, False, "lru")
    acc = np.full(tr.n_layers, tr.top_k, dtype=np.float64)
    miss = misses.mean(axis=0)
    (cache,) = [
        p for p in project_decode(
            expert_bytes=eb, top_k=tr.top_k, n_experts=8, dense_bytes=5e6, budget_slots=cap * tr.n_layers,
            cache_hits_per_token=acc - miss, cache_loads_per_token=miss, hw=Hardware(25.0, 900.0, 60.0),
        ) if p.name == "expert-cache"
    ]  # fmt: skip
    closed = cache.seconds_per_token * tr.n_tokens
    assert kernel.seconds == pytest.approx(closed, rel=1e-12) and demand.seconds == pytest.approx(closed, rel=1e-12)
    assert kernel.hits == demand.hits and kernel.pcie_bytes == pytest.approx(demand.pcie_bytes)


def test_perfect_prediction_hides_every_transfer_it_can():
    """The oracle prefetches every expert of layers 1..L-1 one layer ahead; with the link fast enough to
    deliver them within a layer's compute, only layer 0 (nothing precedes it in the token) ever misses."""
    tr = _trace(2)
    fast = Machine("fast", 900.0, 60.0, 2000.0, pcie_latency_us=0.0)
    c = Costs.of(np.full(tr.n_layers, 1e6), 4e7, fast)
    cap = np.full(tr.n_layers, 4)
    res = prefetch_cache(tr, predictions(tr, "oracle", 1), 1, cap, c, fast, True, "oracle")
    first = Stream(np.ascontiguousarray(tr.experts[:, 0], dtype=np.int32), np.arange(tr.n_tokens) == 0, 8, 8)
    layer0 = make_policy("lru").misses_per_group(first, 4)
    assert res.accesses - res.hits == layer0.sum()
    only0 = select_layers(tr, [int(tr.layer_ids[0])])
    c0 = Costs.of(np.full(1, 1e6), 4e7 / tr.n_layers, fast)
    stall0 = demand_cache(only0, layer0[:, None], c0, True, "0")
    assert res.stall_seconds == pytest.approx(stall0.stall_seconds, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("seed", range(3))
def test_tokens_per_second_never_fall_with_more_bandwidth_or_vram(seed):
    tr = _trace(seed)
    eb = np.full(tr.n_layers, 2e6)
    monotone_in_vram = ("cpu-moe", "static-layers", "cache:lru", "cache:belady", "bound")
    previous = None
    for slots in (8, 12, 16, 24, 32):
        now = {r.name: r.tokens_per_second for r in
               simulate_timeline(tr, expert_bytes=eb, dense_bytes=1e7, slots=slots, machine=M).results}  # fmt: skip
        if previous:
            for name in monotone_in_vram:
                assert now[name] >= previous[name] * (1 - 1e-12), (name, slots)
        previous = now
    slow = None
    for gbps in (5.0, 10.0, 25.0, 64.0):
        m = Machine("m", 900.0, 60.0, gbps)
        now = {r.name: r.tokens_per_second for r in
               simulate_timeline(tr, expert_bytes=eb, dense_bytes=1e7, slots=16, machine=m).results}  # fmt: skip
        if slow:
            assert all(now[n] >= slow[n] * (1 - 1e-12) for n in now), gbps
        slow = now


def test_prefetches_count_as_bandwidth_and_every_strategy_runs():
    tr = _trace(3, lookahead=2)
    eb = np.full(tr.n_layers, 2e6)
    res = simulate_timeline(tr, expert_bytes=eb, dense_bytes=1e7, slots=16, machine=MACHINES["consumer-pcie4"])
    by = {r.name: r for r in res.results}
    assert {"cpu-moe", "static-layers", "cache:lru", "cache:belady", "prefetch:lookahead", "prefetch:oracle",
            "bound"} <= set(by)  # fmt: skip
    for name in ("prefetch:lookahead", "prefetch:cross-layer", "prefetch:transition", "prefetch:oracle"):
        r = by[name]
        misses = r.accesses - r.hits
        assert r.pcie_bytes == pytest.approx((misses + r.prefetch_loads) * 2e6)
        assert r.prefetch_loads > 0 and 0 <= r.wasted_prefetches <= r.prefetch_loads
    caches = [r.seconds for r in res.results if r.name.startswith(("cache:", "prefetch:"))]
    assert by["bound"].seconds <= min(caches) * (1 + 1e-12)
    assert by["cpu-moe"].seconds >= by["static-layers"].seconds
    with pytest.raises(Exception, match="--lookahead 3"):
        simulate_timeline(tr, expert_bytes=eb, dense_bytes=1e7, slots=16, machine=M, distance=3,
                          predictors=("lookahead",))  # fmt: skip


@pytest.mark.kernels
@pytest.mark.parametrize("seed", range(4))
def test_top_rows_matches_the_naive_reference(seed):
    rng = np.random.default_rng(seed)
    n_exp, k, p = 9, 3, (1, 3, 4, 9)[seed]
    src = np.stack([rng.choice(n_exp, k, replace=False) for _ in range(40)]).astype(np.int16)
    table = rng.integers(0, 3, (n_exp, n_exp)).astype((np.int32, np.int64)[seed % 2])  # ties and zeros
    valid = rng.random(40) < 0.8
    out = np.empty((40, p), dtype=np.int16)
    _top_rows(src, valid, table, out)
    assert out.tolist() == reference_timeline.top_rows(src.tolist(), valid.tolist(), table.tolist(), p)


def test_id_only_predictors_learn_from_train_only():
    """A predictor's table comes from `train`: a train trace whose layer 1 always follows layer 0's experts by
    +1 predicts exactly that on any test trace, whatever the test trace's own routing."""
    train = _trace(4)
    ex = train.experts.copy()
    ex[:, 1] = (ex[:, 0] + 1) % 8
    train = train.replace(experts=ex, weights=None)
    test = _trace(5)
    pred = predictions(test, "cross-layer", 1, train)
    want = np.sort((test.experts[:, 0] + 1) % 8, axis=1)
    assert (np.sort(pred[:, 0], axis=1) == want).all()
    assert (pred[:, -1] == -1).all()  # nothing lies beyond the last layer
    tr = predictions(test, "transition", 1, train)
    assert (tr[test.seq_starts] == -1).all()


@pytest.mark.kernels
@pytest.mark.parametrize("seed", range(4))
def test_ubatch_lru_matches_the_naive_reference(seed):
    tr = random_trace(n_tokens=300, n_layers=1, n_experts=12, k=3, n_seq=4, seed=seed)
    lay = np.ascontiguousarray(tr.experts[:, 0])
    for ubatch, cap in ((1, 3), (7, 5), (32, 12), (64, 4)):
        got = _ubatch_lru(lay, tr.seq_starts, tr.seq_ends, ubatch, cap, 12, 32)
        want = reference_timeline.ubatch_lru(lay.tolist(), tr.seq_starts, tr.seq_ends, ubatch, cap, 12, 32)
        assert tuple(int(x) for x in got) == want
        assert (want[4] == 0) == (ubatch < 32) and want[4] <= want[2]  # a sequence's tail may be short


def test_prefill_llama_streams_whole_tensors_from_32_tokens():
    """In a batch of 32 tokens or more llama.cpp copies every CPU layer's whole expert tensor; in a shorter one
    the CPU reads the batch's experts; the cache moves no more than whole tensors for every batch would."""
    tr = _trace(6)
    c = Costs.of(np.full(tr.n_layers, 1e6), 1e7, M)
    big = {r.name: r for r in prefill_estimate(tr, c, gpu_layers=2, capacity=4, ubatch=64)}
    # only batches of 32+ tokens copy whole tensors (a sequence's last batch can be shorter: the CPU computes it)
    sizes = [min(64, b - a) for s0, z in zip(tr.seq_starts, tr.seq_ends, strict=True) for a, b in
             ((a, z) for a in range(s0, z, 64))]  # fmt: skip
    n_big = sum(n >= 32 for n in sizes)
    assert 0 < n_big < len(sizes), sizes  # the fixture trace has both kinds
    assert big["cpu-moe"].pcie_bytes_per_token == pytest.approx(tr.n_layers * 8 * n_big * 1e6 / tr.n_tokens)
    assert big["cpu-moe"].cpu_bytes_per_token > 0 and "batches of 32+ tokens" in big["cpu-moe"].note
    assert big["static-layers"].pcie_bytes_per_token == pytest.approx(big["cpu-moe"].pcie_bytes_per_token / 2)
    every = tr.n_layers * 8 * len(sizes) * 1e6 / tr.n_tokens  # whole tensors for every batch
    assert big["cache:lru"].pcie_bytes_per_token <= every
    small = {r.name: r for r in prefill_estimate(tr, c, gpu_layers=2, capacity=4, ubatch=8)}
    assert small["cpu-moe"].pcie_bytes_per_token == 0 and small["cpu-moe"].cpu_bytes_per_token > 0
    assert "cache:lru" not in {r.name for r in prefill_estimate(tr, c, gpu_layers=0, capacity=1, ubatch=8)}


def test_budgets_families_and_the_verdict():
    assert default_slots(48, 128, 8) == [768, 1536, 3072, 4608]
    assert default_slots(4, 8, 2) == [8, 16, 24]  # never below k per layer, distinct
    tr = _trace(7)
    res = simulate_timeline(tr, expert_bytes=np.full(tr.n_layers, 2e6), dense_bytes=1e7, slots=16, machine=M)
    fam = {r.name: r.family for r in res.results}
    assert fam["static-layers"] == fam["static-experts"] == "static" and fam["cache:lru"] == "cache"
    assert fam["cache:belady"] == fam["prefetch:oracle"] == fam["bound"] == "reference"
    best_cache, best_static = res.best("cache"), res.best("static")
    assert res.cache_wins() == (best_cache.tokens_per_second > best_static.tokens_per_second)
    assert best_cache.name in res.verdict() and best_static.name in res.verdict()
    with pytest.raises(Exception, match="unknown"):
        simulate_timeline(tr, expert_bytes=np.full(tr.n_layers, 2e6), dense_bytes=0, slots=16, machine=M,
                          policies=["mru"])  # fmt: skip
    with pytest.raises(Exception, match="--pcie-gbps"):
        Machine("bad", 900.0, 60.0, 0.0)
