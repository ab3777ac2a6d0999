"""Adaptive online cache policies (kernels in `moescope.cache.kernels_adaptive`), registered by name.

Importing this module adds them to `moescope.cache.policies.POLICIES`; it does not validate streams (the
simulator does) and learns nothing from the train split.

    >>> import moescope.cache.policies_adaptive
    >>> POLICIES["lirs"](PolicyParams()).run(stream, capacity=16)  # [hits, demand_misses, 0, 0]
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from moescope.cache import kernels_adaptive as KA
from moescope.cache.policies import _NO_GROUPS, CachePolicy, Replayer, Stream, register


@register
class LIRS(CachePolicy):
    name = "lirs"
    summary = "low inter-reference recency set (LIR items kept, 1% of slots for HIR items; Jiang & Zhang 2002)"
    windowed = True

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return KA.lirs(stream.req, stream.reset, stream.n_items, capacity)

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        out = np.zeros(stream.req.shape[0], dtype=np.int64)
        KA._lirs(stream.req, stream.reset, stream.n_items, capacity, out)
        return out

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        st = KA.lirs_state(n_items)
        return Replayer(lambda req, reset, g0, nu: KA.lirs_run(req, reset, g0, capacity, *st, _NO_GROUPS), st[-1])


@register
class WTinyLFU(CachePolicy):
    name = "w-tinylfu"
    summary = "1% window LRU + main SLRU, admission by a count-min frequency sketch (Einziger et al. 2017)"
    windowed = True

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return KA.wtinylfu(stream.req, stream.reset, stream.n_items, capacity)

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        out = np.zeros(stream.req.shape[0], dtype=np.int64)
        KA._wtinylfu(stream.req, stream.reset, stream.n_items, capacity, out)
        return out

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        st = KA.wtinylfu_state(n_items, capacity)
        return Replayer(lambda req, reset, g0, nu: KA.wtinylfu_run(req, reset, g0, capacity, *st, _NO_GROUPS), st[-1])


@register
class LeCaR(CachePolicy):
    name = "lecar"
    summary = "LRU or LFU evicts by learned weights, regret from ghost hits (Vietri et al. 2018; seeded draws)"
    windowed = True
    seed: ClassVar[int] = 0  # the draws are hashes of (seed, access index): every run is reproducible

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return KA.lecar(stream.req, stream.reset, stream.n_items, capacity, self.seed)

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        out = np.zeros(stream.req.shape[0], dtype=np.int64)
        KA._lecar(stream.req, stream.reset, stream.n_items, capacity, self.seed, out)
        return out

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        st, seed = KA.lecar_state(n_items, capacity, k), self.seed

        def feed(req: np.ndarray, reset: np.ndarray, g0: int, nu: np.ndarray | None) -> None:
            KA.lecar_run(req, reset, g0, capacity, seed, *st, _NO_GROUPS)

        return Replayer(feed, st[-2])


@register
class Cacheus(CachePolicy):
    name = "cacheus"
    summary = "SR-LRU or CR-LFU evicts by learned weights, adaptive learning rate (Rodriguez et al. 2021; seeded)"
    windowed = True
    seed: ClassVar[int] = 0  # eviction and learning-rate draws are hashes of (seed, access index): reproducible

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return KA.cacheus(stream.req, stream.reset, stream.n_items, capacity, self.seed)

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        out = np.zeros(stream.req.shape[0], dtype=np.int64)
        KA._cacheus(stream.req, stream.reset, stream.n_items, capacity, self.seed, out)
        return out

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        st, seed = KA.cacheus_state(n_items, capacity, k), self.seed

        def feed(req: np.ndarray, reset: np.ndarray, g0: int, nu: np.ndarray | None) -> None:
            KA.cacheus_run(req, reset, g0, capacity, seed, *st, _NO_GROUPS)

        return Replayer(feed, st[-2])
