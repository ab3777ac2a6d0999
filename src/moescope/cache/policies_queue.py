"""Queue-based online cache policies (SIEVE, S3-FIFO, 2Q, SLRU), registered in `moescope.cache.policies.POLICIES`.

Importing this module registers "sieve", "s3-fifo", "2q" and "slru"; it adds no behaviour beyond the kernels in
`moescope.cache.kernels_queue` (semantics, sources and the group rule are described there). None learns,
prefetches or bypasses; each reports per-group demand misses for the decode timeline.

    >>> from moescope.cache import make_policy, policies_queue  # importing policies_queue registers them
    >>> make_policy("sieve").run(stream, capacity=16)      # [hits, demand_misses, 0, 0]
"""

from __future__ import annotations

import numpy as np

from moescope.cache import kernels_queue as KQ
from moescope.cache.policies import _NO_GROUPS, CachePolicy, Replayer, Stream, register


class _QueuePolicy(CachePolicy):
    """A policy replayed by one kernel ``_kernel(req, reset, n_items, capacity, per_group)``, or window by
    window by ``_run(req, reset, g0, capacity, *_state(n_items), per_group)``."""

    windowed = True

    @staticmethod
    def _kernel(req, reset, n_items, capacity, per_group):
        raise NotImplementedError

    @staticmethod
    def _state(n_items):
        raise NotImplementedError

    @staticmethod
    def _run(req, reset, g0, capacity, *state):
        raise NotImplementedError

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        st, run = self._state(n_items), self._run
        return Replayer(lambda req, reset, g0, nu: run(req, reset, g0, capacity, *st, _NO_GROUPS), st[-1])

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return self._kernel(stream.req, stream.reset, stream.n_items, capacity, np.empty(0, dtype=np.int64))

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        out = np.zeros(stream.req.shape[0], dtype=np.int64)
        self._kernel(stream.req, stream.reset, stream.n_items, capacity, out)
        return out


@register
class Sieve(_QueuePolicy):
    name = "sieve"
    summary = "SIEVE: FIFO with a visited bit and a moving hand that evicts the first unvisited expert"
    _kernel = staticmethod(KQ._sieve)
    _state = staticmethod(KQ.sieve_state)
    _run = staticmethod(KQ.sieve_run)


@register
class S3FIFO(_QueuePolicy):
    name = "s3-fifo"
    summary = "S3-FIFO: a small FIFO filters one-use experts, a main FIFO with 2-bit counts, a ghost FIFO"
    _kernel = staticmethod(KQ._s3fifo)
    _state = staticmethod(KQ.s3fifo_state)
    _run = staticmethod(KQ.s3fifo_run)


@register
class TwoQ(_QueuePolicy):
    name = "2q"
    summary = "2Q: first use in a FIFO (Ain), reuse after eviction from it in an LRU (Am), ghost ids (Aout)"
    _kernel = staticmethod(KQ._twoq)
    _state = staticmethod(KQ.twoq_state)
    _run = staticmethod(KQ.twoq_run)


@register
class SLRU(_QueuePolicy):
    name = "slru"
    summary = "segmented LRU: 4 LRU segments, a hit moves an expert one segment up, overflow moves one down"
    _kernel = staticmethod(KQ._slru)
    _state = staticmethod(KQ.slru_state)
    _run = staticmethod(KQ.slru_run)
