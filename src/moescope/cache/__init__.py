"""Expert-cache simulator: replay a routing trace through caches of experts in fast memory.

Semantics (what every number here means):

- **Caches.** One cache per MoE layer holding `capacity` experts (capacity >= top-k), or one pooled cache
  over all layers (`pooled=True`, capacity x layers experts; items are (layer, expert) pairs). Without
  capacities asked, `default_capacities` (about E/8, E/4, E/2, strictly between k and E) for CLI and report.
- **Groups.** A token's k experts at a layer are needed together: hits are served, then each missing
  expert is loaded, and a policy may never evict an expert the current token needs.
- **Sequences.** One long-lived cache serves all sequences in trace order (a server), or each sequence
  starts empty (`reset_per_sequence=True`).
- **Counts.** A *demand miss* is a load the token waits for; a *prefetch load* is issued ahead by a
  prefetching policy; a *wasted prefetch* is a prefetched expert evicted (or left at the end) unused;
  *transfers* = demand misses + prefetch loads; bytes = transfers x expert bytes. hits + demand misses =
  accesses = tokens x layers x k.
- **Split.** Policies that learn (LFU-static, co-activation prefetch) fit on the first half of every
  sequence; all policies replay the second halves (`split="test"`), or everything in-sample (`"all"`).
- **Cold misses** are counted alike for every policy: a cache starts empty (at the start, and at each
  sequence with `reset_per_sequence`), and a static set loads each pinned expert at its first use.
- **Belady/MIN** (evict the expert, not needed now, whose next use is furthest) is the offline optimum of
  demand loading and the floor every table shows; a prefetcher may go below it on demand misses only by
  paying prefetch loads, and a static set (LFU-static, which serves misses from slow memory without
  loading them, "bypass") is not bound by it either, though in practice it is the worst. A row below the
  floor says which of the two it is (`BELOW_FLOOR_WHY`); a demand-loading policy below it is a bug.

Modules: `kernels` (numba replays), `policies` (the registry `POLICIES`; the queue family SIEVE, S3-FIFO, 2Q,
SLRU in `kernels_queue` / `policies_queue`, LIRS, W-TinyLFU, LeCaR, Cacheus in `kernels_adaptive` /
`policies_adaptive`; a learned eviction in `kernels_learned` / `policies_learned`), `simulate` (tables,
curves, budget allocation), `streamed` (a store replayed in layer groups), `windowed` (a store replayed a
window of tokens at a time: memory bounded at any length), `cost` (projected decode speed).

    >>> from moescope.cache import simulate
    >>> simulate(trace, [8, 16, 32], ["lru", "belady"]).rows()
"""

from moescope.cache.cost import ASSUMPTIONS, Hardware, Projection, project_decode
from moescope.cache.policies import POLICIES, CachePolicy, PolicyParams, Stream, make_policy

# the policy families kept in their own modules register themselves on import (before the CLI reads POLICIES)
from moescope.cache import policies_adaptive as _policies_adaptive  # noqa: F401  isort: skip
from moescope.cache import policies_learned as _policies_learned  # noqa: F401  isort: skip
from moescope.cache import policies_queue as _policies_queue  # noqa: F401  isort: skip
from moescope.cache.simulate import (
    Allocation,
    CacheResult,
    MissCurves,
    allocate,
    budget_projection,
    build_streams,
    default_capacities,
    miss_curves,
    simulate,
)

__all__ = [
    "ASSUMPTIONS",
    "POLICIES",
    "Allocation",
    "CachePolicy",
    "CacheResult",
    "Hardware",
    "MissCurves",
    "PolicyParams",
    "Projection",
    "Stream",
    "allocate",
    "budget_projection",
    "build_streams",
    "default_capacities",
    "make_policy",
    "miss_curves",
    "project_decode",
    "simulate",
]
