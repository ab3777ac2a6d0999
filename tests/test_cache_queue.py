"""The queue-based cache policies (SIEVE, S3-FIFO, 2Q, SLRU): kernels against their naive references (random and
hypothesis streams, per-group misses included), the registry contract, and libCacheSim agreement for k = 1."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_queue
from moescope.cache import POLICIES, PolicyParams, Stream, make_policy, policies_queue
from moescope.cache import kernels as K
from moescope.imports import read_input
from test_cache import _oracle_general

QUEUE = [name for name, cls in POLICIES.items() if cls.__module__ == policies_queue.__name__]


def _stream(seed: int, k: int, n_items: int, groups: int) -> Stream:
    """A seeded stream with locality (repeated and shuffled sets) and random resets."""
    rng = np.random.default_rng(seed)
    req = np.argsort(rng.random((groups, n_items)), axis=1)[:, :k].astype(np.int32)
    for g in range(1, groups):
        if rng.random() < 0.3:
            req[g] = req[g - 1][rng.permutation(k)]
    reset = np.zeros(groups, dtype=bool)
    reset[0] = True
    reset[rng.random(groups) < 0.03] = True
    return Stream(req, reset, n_items, n_items)


def _check(name: str, s: Stream, capacity: int) -> None:
    policy = make_policy(name)
    per = policy.misses_per_group(s, capacity)
    want = reference_queue.REFERENCES[name](s.req, s.reset, capacity)
    assert tuple(policy.run(s, capacity).tolist()) == want, (name, capacity)
    assert per.tolist() == reference_queue.PER_GROUP[name](s.req, s.reset, capacity), (name, capacity)


def test_importing_registers_the_queue_policies():
    assert (
        set(QUEUE)
        == {"sieve", "s3-fifo", "2q", "slru"}
        == set(reference_queue.REFERENCES)
        == set(reference_queue.PER_GROUP)
    )
    for name in QUEUE:
        cls = POLICIES[name]
        assert cls.summary and not (cls.learns or cls.prefetches or cls.offline or cls.bypass)


@pytest.mark.kernels
@pytest.mark.parametrize("name", QUEUE)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("seed", range(8))
def test_kernel_matches_reference(name, k, seed):
    """Hits, misses and every group's misses equal the naive reference, at capacities from k to all items."""
    n_items = 5 + 5 * (seed % 4)
    s = _stream(seed, k, n_items, groups=150)
    for capacity in sorted({k, k + 1, max(k, n_items // 4), max(k, n_items // 2), n_items - 1, n_items}):
        _check(name, s, capacity)


@st.composite
def _streams(draw):
    n_items = draw(st.integers(2, 9))
    k = draw(st.integers(1, min(4, n_items)))
    rows = draw(st.lists(st.permutations(range(n_items)), min_size=1, max_size=40))
    resets = draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows)))
    req = np.array([r[:k] for r in rows], dtype=np.int32)
    reset = np.array(resets, dtype=bool)
    reset[0] = True
    capacity = draw(st.integers(k, n_items))
    return Stream(req, reset, n_items, n_items), capacity


@pytest.mark.kernels
@pytest.mark.parametrize("name", QUEUE)
@settings(max_examples=80)
@given(case=_streams())
def test_kernel_matches_reference_property(name, case):
    s, capacity = case
    _check(name, s, capacity)


@pytest.mark.kernels
@pytest.mark.parametrize("name", QUEUE)
@pytest.mark.parametrize("seed", range(6))
def test_queue_policy_contract(name, seed):
    """The registry contract: hits + misses = accesses; per-group misses sum to the misses, each between 0
    and k; no fewer misses than Belady; a cache holding every item misses each used item once per segment."""
    rng = np.random.default_rng(seed)
    n_items = int(rng.integers(4, 12))
    k = int(rng.integers(1, min(4, n_items) + 1))
    s = _stream(seed, k, n_items, groups=60)
    policy = make_policy(name, PolicyParams())
    cold = sum(len({x for row in seg for x in row}) for seg in reference_queue._segments(s.req, s.reset))
    for capacity in range(k, n_items + 1):
        hits, misses, loads, wasted = policy.run(s, capacity).tolist()
        assert hits + misses == s.req.size and min(hits, misses) >= 0 and loads == wasted == 0
        per = policy.misses_per_group(s, capacity)
        assert per.sum() == misses and per.min() >= 0 and per.max() <= k
        assert misses >= K.scan_policy(s.req, s.reset, s.n_items, capacity, K.SCAN_BELADY, 0)[1]
        if capacity == n_items:
            assert misses == cold


# libCacheSim's class and the capacities where its semantics are ours (see `moescope.cache.kernels_queue`):
# its S3FIFO refuses capacity < 10 and never admits to its small FIFO of 1 item at 10-19 (all miss), its TwoQ
# admits nothing below capacity 4 (Ain of 0 items), its SLRU overflows segment 0 by capacity % 4 items
# (and then evicts on some hits); at the capacities below, every count is exactly equal.
_LCS = {
    "sieve": ("Sieve", (2, 8, 32)),
    "s3-fifo": ("S3FIFO", (20, 32, 48)),
    "2q": ("TwoQ", (4, 8, 32)),
    "slru": ("SLRU", (4, 8, 32)),
}


@pytest.mark.parametrize("source", ["zipf", "esft"])
def test_queue_policies_agree_with_libcachesim(tmp_path, source, request):
    lcs = pytest.importorskip("libcachesim")
    if source == "esft":
        realdata = request.getfixturevalue("realdata")
        ids = read_input(realdata / "esft-dsv2lite" / "trace.npz").experts[:, 5, :].ravel().astype(np.int64)
    else:
        ids = np.random.default_rng(0).zipf(1.3, 50_000) % 200
    path = tmp_path / "t.oracleGeneral.bin"
    _oracle_general(path, ids)
    n_items = int(ids.max()) + 1
    s = Stream(ids.reshape(-1, 1).astype(np.int32), np.r_[True, np.zeros(ids.size - 1, bool)], n_items, n_items)
    assert set(_LCS) == set(QUEUE)
    for name, (cls_name, capacities) in _LCS.items():
        for capacity in capacities:
            reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
            miss_ratio, _ = getattr(lcs, cls_name)(cache_size=capacity).process_trace(reader)
            misses = make_policy(name).run(s, capacity)[1]
            assert misses == round(miss_ratio * ids.size), (name, capacity)
