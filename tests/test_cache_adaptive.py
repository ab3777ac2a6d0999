"""Adaptive cache policies (`moescope.cache.kernels_adaptive`): each kernel against its naive reference
(hits, misses and per-group misses, k in {1, 2, 4}, with resets), the registry contract, and agreement with
libCacheSim on k = 1 streams (a zipf stream and, when present, a real trace)."""

from __future__ import annotations

import numpy as np
import pytest

import reference_adaptive as RA
from moescope.cache import (
    PolicyParams,
    Stream,
    make_policy,
    policies_adaptive,  # noqa: F401  (registers the adaptive policies)
)
from moescope.cache import kernels as K
from moescope.cache import kernels_adaptive as KA
from moescope.cache.policies import POLICIES
from moescope.imports import read_input
from test_cache import _oracle_general

LECAR_SEED = 7  # any seed: kernel and reference draw the same uniforms (LeCaR and Cacheus)
ADAPTIVE = {
    "lirs": (KA.lirs, KA._lirs, RA.cache_lirs),
    "w-tinylfu": (KA.wtinylfu, KA._wtinylfu, RA.cache_wtinylfu),
    "lecar": (
        lambda req, reset, n, c: KA.lecar(req, reset, n, c, LECAR_SEED),
        lambda req, reset, n, c, per: KA._lecar(req, reset, n, c, LECAR_SEED, per),
        lambda req, reset, c: RA.cache_lecar(req, reset, c, LECAR_SEED),
    ),
    "cacheus": (
        lambda req, reset, n, c: KA.cacheus(req, reset, n, c, LECAR_SEED),
        lambda req, reset, n, c, per: KA._cacheus(req, reset, n, c, LECAR_SEED, per),
        lambda req, reset, c: RA.cache_cacheus(req, reset, c, LECAR_SEED),
    ),
}


def _stream(seed: int, k: int, n_items: int, groups: int) -> Stream:
    """A seeded stream with locality (repeats of the previous group, a hot subset) and random resets."""
    rng = np.random.default_rng(seed)
    hot = max(k + 1, n_items // 3)
    req = np.empty((groups, k), dtype=np.int32)
    for g in range(groups):
        u = rng.random()
        if g and u < 0.3:
            req[g] = req[g - 1][rng.permutation(k)]
        elif u < 0.7:
            req[g] = rng.permutation(hot)[:k]
        else:
            req[g] = rng.permutation(n_items)[:k]
    reset = np.zeros(groups, dtype=bool)
    reset[0] = True
    reset[rng.random(groups) < 0.02] = True
    return Stream(req, reset, n_items, n_items)


def _prefix_misses(ref, s: Stream, capacity: int) -> list[int]:
    """Each group's demand misses from the reference run on growing prefixes (an online policy's first g
    groups do not depend on what follows)."""
    total = [0] + [ref(s.req[:g], s.reset[:g], capacity)[1] for g in range(1, s.req.shape[0] + 1)]
    return np.diff(total).tolist()


@pytest.mark.kernels
@pytest.mark.parametrize("name", list(ADAPTIVE))
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("seed", range(6))
def test_kernel_matches_reference(name, k, seed):
    kernel, kernel_groups, ref = ADAPTIVE[name]
    n_items = int(np.random.default_rng(seed).integers(k + 2, 24))
    s = _stream(seed, k, n_items, 400)
    capacities = sorted({k, k + 1, (k + n_items) // 2, n_items - 1, n_items})
    for capacity in capacities:
        got = kernel(s.req, s.reset, n_items, capacity)
        assert tuple(int(v) for v in got) == ref(s.req, s.reset, capacity), (name, k, seed, capacity)
        per = np.zeros(s.req.shape[0], dtype=np.int64)
        assert kernel_groups(s.req, s.reset, n_items, capacity, per).tolist() == got.tolist()
        assert per.sum() == got[1]
    short = Stream(s.req[:60], s.reset[:60], n_items, n_items)
    for capacity in capacities:
        per = np.zeros(60, dtype=np.int64)
        kernel_groups(short.req, short.reset, n_items, capacity, per)
        assert per.tolist() == _prefix_misses(ref, short, capacity), (name, k, seed, capacity)


@pytest.mark.kernels
@pytest.mark.parametrize("name", list(ADAPTIVE))
@pytest.mark.parametrize("seed", range(4))
def test_registered_policies_keep_the_contract(name, seed):
    """Registered on import; hits + misses = accesses; per-group misses add up; a cache holding every item
    misses only cold (once per item per segment); Belady is a floor."""
    assert name in POLICIES
    k = (1, 2, 4, 3)[seed]
    s = _stream(seed + 100, k, 12, 200)
    policy = make_policy(name, PolicyParams())
    cold = sum(
        len(set(s.req[a:b].ravel().tolist()))
        for a, b in zip(np.flatnonzero(s.reset), [*np.flatnonzero(s.reset)[1:], s.req.shape[0]], strict=True)
    )
    for capacity in range(k, s.n_items + 1):
        hits, misses, loads, wasted = policy.run(s, capacity).tolist()
        assert hits + misses == s.req.size and loads == wasted == 0 and min(hits, misses) >= 0
        per = policy.misses_per_group(s, capacity)
        assert per.shape == (s.req.shape[0],) and per.sum() == misses and per.min() >= 0 and per.max() <= k
        assert misses >= K.scan_policy(s.req, s.reset, s.n_items, capacity, K.SCAN_BELADY, 0)[1]
        if capacity == s.n_items:
            assert misses == cold


# libCacheSim agreement (k = 1): a bound on |our miss ratio - libCacheSim's| per policy and capacity, with the
# reason, and the esft layers pooled into the k = 1 stream (item = slot of the layer * 64 + expert).
# LIRS: libCacheSim's hit on a resident HIR item outside S demotes an LIR item and, with its 1-item Q, evicts
# the item just hit while leaving it marked resident in S (module docstring of kernels_adaptive), so its cache
# holds up to one item more than its capacity. That is worth 9 points of miss ratio at capacity 2 (zipf:
# 0.665 vs our 0.753, LRU 0.840), where we only require libCacheSim <= ours <= LRU; at 8 and 32 the
# difference is 0.0000 and 0.0005 (zipf), 0.0015 and 0.0031 (esft layer 5).
# W-TinyLFU: libCacheSim's window is int(0.01 x capacity) items, so it refuses capacities below 100; its
# sketch is a counting Bloom filter with its own hashing, fed on main hits, inserts and window victims and
# halved every 32 x main-size main hits, without a doorkeeper, where ours records every access (Caffeine,
# TinyLFU paper). Admission decisions differ on near ties only: the difference is at most 0.0021 (zipf, 100
# to 150 items of 200) and 0.0096 (esft layers 5-7, 192 items), so the bound is 0.01.
# LeCaR: libCacheSim draws its expert with an unseeded `next_rand() % 100` (its own runs differ by up to 0.004
# at capacity 8), ours with seeded hashes, so only the miss ratio can agree. On esft (layer 5) we agree within
# 0.0013; on zipf libCacheSim is lower by 0.021, 0.012, 0.003 at 2, 8, 32 (over seeds 0-3, each below LRU).
# The gap is not its 1/100 draw quantisation (which moves ours by 0.000 and 0.002) and was not traced further;
# the bounds are set just above it, so a regression (LeCaR drifting to LRU) still fails.
# Cacheus: libCacheSim draws its expert and learning rates unseeded (over 10 of its runs its miss ratio spans
# 0.2994-0.3142 on zipf at capacity 32, 0.7340-0.7388 on esft at 8), so only the miss ratio can agree. Its
# SR-LRU loses the new/demoted flags when items move between lists, so SR's size never adapts there, and it
# computes the interval hit rate with integer division (module docstring of kernels_adaptive); we keep the
# paper's adaptation and a float hit rate. Ours (seed 0) is within 0.004 of it at capacity 2, 0.007 / 0.016
# (zipf / esft layer 5) at 8 and 0.014 / 0.004 at 32, mostly above it; with both differences disabled in the
# reference the gap is about 0.01 or less. The bounds sit above that and still fail LRU on zipf (0.8402,
# 0.5987, 0.3596 at 2, 8, 32).
LIBCACHESIM = {
    "lirs": ((5,), {2: None, 8: 0.005, 32: 0.005}),
    "w-tinylfu": ((5, 6, 7), {100: 0.01, 128: 0.01, 150: 0.01}),
    "lecar": ((5,), {2: 0.03, 8: 0.015, 32: 0.005}),
    "cacheus": ((5,), {2: 0.01, 8: 0.03, 32: 0.03}),
}


def _lcs_ids(source: str, layers: tuple[int, ...], request) -> np.ndarray:
    """A k = 1 stream: zipf(1.3) over 200 ids, or the esft trace's `layers` token by token (pooled ids)."""
    if source == "zipf":
        return np.random.default_rng(0).zipf(1.3, 50_000) % 200
    realdata = request.getfixturevalue("realdata")
    tr = read_input(realdata / "esft-dsv2lite" / "trace.npz")
    ex = tr.experts[:, list(layers), :].astype(np.int64)
    return (ex + tr.n_experts * np.arange(len(layers))[None, :, None]).ravel()


@pytest.mark.parametrize("source", ["zipf", "esft"])
@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_agrees_with_libcachesim(tmp_path, source, name, request):
    lcs = pytest.importorskip("libcachesim")
    classes = {"lirs": lcs.LIRS, "w-tinylfu": lcs.WTinyLFU, "lecar": lcs.LeCaR, "cacheus": lcs.Cacheus}
    layers, bounds = LIBCACHESIM[name]
    ids = _lcs_ids(source, layers, request)
    path = tmp_path / "t.oracleGeneral.bin"
    _oracle_general(path, ids)
    req = ids.reshape(-1, 1).astype(np.int32)
    reset = np.r_[True, np.zeros(ids.size - 1, bool)]
    n_items = int(ids.max()) + 1
    stream = Stream(req, reset, n_items, n_items)
    for capacity, tol in bounds.items():
        reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
        theirs, _ = classes[name](cache_size=capacity).process_trace(reader)
        ours = make_policy(name).run(stream, capacity)[1] / ids.size
        if tol is None:  # libCacheSim over-holds: a one-sided check against it and LRU
            assert theirs <= ours <= make_policy("lru").run(stream, capacity)[1] / ids.size, (capacity, ours, theirs)
        else:
            assert abs(ours - theirs) <= tol, (name, source, capacity, ours, theirs)


@pytest.mark.kernels
@pytest.mark.parametrize("seed", range(64))
def test_cacheus_survives_weight_underflow(seed):
    """Regression: Cacheus' learning rate is unbounded, and on long streams it reaches the thousands, where
    exp(-lr) underflows; a ghost hit on the expert holding all the weight then normalised 0 / 0 (the kernel
    raised ZeroDivisionError). 3000-group k = 2 streams reach it (seeds 19 and 52 here did); kernel and
    reference must run and agree."""
    k = 2
    n_items = int(np.random.default_rng(seed).integers(k + 2, 40))
    s = _stream(seed, k, n_items, 3000)
    kernel, _, ref = ADAPTIVE["cacheus"]
    for capacity in sorted({k, k + 1, (k + n_items) // 2, n_items - 1, n_items}):
        got = kernel(s.req, s.reset, n_items, capacity)
        assert tuple(int(v) for v in got) == ref(s.req, s.reset, capacity), (seed, capacity)


@pytest.mark.kernels
def test_cacheus_runs_on_the_law_task(realdata):
    """Regression: per-layer streams of the esft law task (k = 6, 64 experts) at capacities 16 and 32 drove
    the weights to 0 / 0 (layer 8 at capacity 16 first); every layer now runs, kernel equal to reference."""
    from moescope.slicing import select_labels

    tr = select_labels(read_input(realdata / "esft-dsv2lite" / "trace.npz"), ["law"])
    reset = np.zeros(tr.experts.shape[0], dtype=bool)
    reset[0] = True
    kernel, _, ref = ADAPTIVE["cacheus"]
    for layer in range(tr.experts.shape[1]):
        req = np.ascontiguousarray(tr.experts[:, layer, :], dtype=np.int32)
        for capacity in (16, 32):
            got = kernel(req, reset, tr.n_experts, capacity)
            assert tuple(int(v) for v in got) == ref(req, reset, capacity), (layer, capacity)
