"""Score a placement on routing it was not fitted to: devices per token, load balance, experts per device.

Per MoE layer, replaying the scored tokens in order:

- **Distinct devices per token**: ``|{device serving e : e in the token's k experts}|`` -- how many devices
  the token's hidden state is sent to (all-to-all traffic). Reported as the mean and the distribution
  ``hist [layers, min(k, D) + 1]`` (tokens by device count).
- **Load** of a device: the routing selections (token-expert pairs) it serves. ``load CV`` = population
  std / mean over devices; ``max/mean`` = the hottest device's load over the mean (the straggler factor).
- **Experts per device**: occupied slots (experts and replica copies) -- the memory cost.

Overall figures: the mean devices per token over all layers and tokens; the mean over layers of each
layer's CV and max/mean (each layer is its own all-to-all, so a layer's straggler is not averaged away
by another layer), plus the worst layer; the most experts any device holds.

**Which copy serves a token** (with replicas; a rule a serving system can apply online, from the token's
experts and the loads so far): the token uses the smallest set of devices that holds all its k experts;
each expert is served by its least-loaded copy in that set; among equally small sets, the one with the
least total load (of the copies serving the token) wins; remaining ties go to the set whose smallest
differing device is lower, and within a set to the lower device. Loads are this layer's selections
served so far, before the token. Exact by enumeration of the copies of the experts that no forced
device (an expert's only copy) holds, up to `MAX_ENUM` combinations; beyond that (many replicas of many
experts in one token) a greedy cover is used. Without replicas every expert has one device and the rule
is moot.

Kernels are parallel across layers. Pure functions, no I/O.

    >>> score = score_placement(placement, test_trace)
    >>> score.mean_devices, score.mean_cv
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moescope._jit import njit, njit_parallel, prange
from moescope.errors import UsageError
from moescope.place.layout import Placement
from moescope.trace import RoutingTrace

MAX_ENUM = 4096  # copy combinations enumerated per token before the greedy cover takes over


def candidates(table: np.ndarray, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Devices holding each expert: ``cand [layers, E, C] int64`` (ascending, -1 padded), ``ncand [layers, E]``.

    table : [layers, D, slots] expert ids, -1 empty.
    """
    n_lay, n_dev, _ = table.shape
    ncand = np.zeros((n_lay, n_experts), dtype=np.int64)
    for layer in range(n_lay):
        for d in range(n_dev):
            held = table[layer, d][table[layer, d] >= 0]
            ncand[layer, held] += 1
    cand = np.full((n_lay, n_experts, max(1, int(ncand.max()))), -1, dtype=np.int64)
    fill = np.zeros((n_lay, n_experts), dtype=np.int64)
    for layer in range(n_lay):
        for d in range(n_dev):
            for e in table[layer, d][table[layer, d] >= 0].tolist():
                cand[layer, e, fill[layer, e]] = d
                fill[layer, e] += 1
    return cand, ncand


@njit
def _set_cost(row, layer, k, cand, ncand, mark, stamp, load):
    """Summed current load of each multi-copy expert's least-loaded copy on a marked device."""
    cost = 0
    for j in range(k):
        e = row[j]
        if ncand[layer, e] > 1:
            best = -1
            for c in range(ncand[layer, e]):
                d = cand[layer, e, c]
                if mark[d] == stamp and (best < 0 or load[d] < load[best]):
                    best = d
            cost += load[best]
    return cost


@njit
def _route_layer(experts, layer, cand, ncand, max_enum, hist, load):
    """Replay ``experts [tokens, layers, k]`` at one layer: add to ``hist [m + 1]`` and ``load [D]`` (see module)."""
    n_tok, k = experts.shape[0], experts.shape[2]
    n_dev = load.shape[0]
    used = np.zeros(n_dev, dtype=np.int64)  # stamp t + 1: device in the token's forced set F
    mark = np.zeros(n_dev, dtype=np.int64)  # stamp: device in the candidate set being costed
    row = np.empty(k, dtype=np.int64)
    unc = np.empty(k, dtype=np.int64)
    radix = np.zeros(k, dtype=np.int64)
    pick = np.empty(k, dtype=np.int64)
    best_pick = np.empty(k, dtype=np.int64)
    best_mask = np.zeros(n_dev, dtype=np.bool_)
    serve = np.empty(k, dtype=np.int64)
    stamp = 0
    for t in range(n_tok):
        stamp += 1
        f_stamp = stamp
        nd = 0
        for j in range(k):
            row[j] = experts[t, layer, j]
        for j in range(k):
            e = row[j]
            if ncand[layer, e] == 1:
                d = cand[layer, e, 0]
                if used[d] != f_stamp:
                    used[d] = f_stamp
                    nd += 1
        nu = 0
        for j in range(k):
            e = row[j]
            if ncand[layer, e] > 1:
                covered = False
                for c in range(ncand[layer, e]):
                    covered = covered or used[cand[layer, e, c]] == f_stamp
                if not covered:
                    unc[nu] = e
                    nu += 1
        # the final device set: F plus the best pick of copies for the uncovered experts
        combos = 1
        for i in range(nu):
            combos *= ncand[layer, unc[i]]
            if combos > max_enum:
                break
        best_n, best_cost = -1, 0
        if nu > 0 and combos <= max_enum:
            for i in range(nu):
                radix[i] = 0
            for _ in range(combos):
                stamp += 1
                n_new = 0
                for d in range(n_dev):
                    if used[d] == f_stamp:
                        mark[d] = stamp
                for i in range(nu):
                    d = cand[layer, unc[i], radix[i]]
                    pick[i] = d
                    if mark[d] != stamp:
                        mark[d] = stamp
                        n_new += 1
                better = best_n < 0 or n_new < best_n
                if not better and n_new == best_n:
                    cost = _set_cost(row, layer, k, cand, ncand, mark, stamp, load)
                    if cost < best_cost:
                        better = True
                    elif cost == best_cost:
                        # the set holding the smallest device of the symmetric difference wins
                        for d in range(n_dev):
                            a = mark[d] == stamp
                            if a != best_mask[d]:
                                better = a
                                break
                if better:
                    best_cost = _set_cost(row, layer, k, cand, ncand, mark, stamp, load)
                    best_n = n_new
                    for i in range(nu):
                        best_pick[i] = pick[i]
                    for d in range(n_dev):
                        best_mask[d] = mark[d] == stamp
                i = 0
                while i < nu:
                    radix[i] += 1
                    if radix[i] < ncand[layer, unc[i]]:
                        break
                    radix[i] = 0
                    i += 1
            stamp += 1
            for d in range(n_dev):
                if best_mask[d]:
                    mark[d] = stamp
            nd += best_n
        elif nu > 0:
            # greedy cover: the device holding most uncovered experts (ties: least loaded, then lowest id)
            stamp += 1
            for d in range(n_dev):
                if used[d] == f_stamp:
                    mark[d] = stamp
            left = nu
            while left > 0:
                best_d, best_hits = -1, 0
                for d in range(n_dev):
                    if mark[d] == stamp:
                        continue
                    hits = 0
                    for i in range(nu):
                        if unc[i] >= 0:
                            for c in range(ncand[layer, unc[i]]):
                                if cand[layer, unc[i], c] == d:
                                    hits += 1
                    if hits > best_hits or (hits == best_hits and hits > 0 and load[d] < load[best_d]):
                        best_d, best_hits = d, hits
                mark[best_d] = stamp
                nd += 1
                for i in range(nu):
                    if unc[i] >= 0:
                        for c in range(ncand[layer, unc[i]]):
                            if cand[layer, unc[i], c] == best_d:
                                unc[i] = -1
                                left -= 1
                                break
        else:
            stamp += 1
            for d in range(n_dev):
                if used[d] == f_stamp:
                    mark[d] = stamp
        # serve each expert from its least-loaded copy in the final set (loads before this token)
        for j in range(k):
            e = row[j]
            if ncand[layer, e] == 1:
                serve[j] = cand[layer, e, 0]
            else:
                best = -1
                for c in range(ncand[layer, e]):
                    d = cand[layer, e, c]
                    if mark[d] == stamp and (best < 0 or load[d] < load[best]):
                        best = d
                serve[j] = best
        for j in range(k):
            load[serve[j]] += 1
        hist[nd] += 1


@njit_parallel
def _route(experts, cand, ncand, max_enum, hist, load):
    """All layers of ``experts [tokens, layers, k]`` side by side: ``hist [layers, m + 1]``, ``load [layers, D]``."""
    for layer in prange(experts.shape[1]):
        _route_layer(experts, layer, cand, ncand, max_enum, hist[layer], load[layer])


DISTINCT_BLOCK = 1 << 13  # tokens per parallel block of `_distinct_single` (bounds its partial counts, not results)


@njit_parallel
def _distinct_single(experts, dev, hist, load):
    """Replica-free fast path: ``dev [layers, E]`` device of each expert; fills ``hist`` and ``load``.

    Token blocks run in parallel, each reading its tokens' rows whole (all layers of a token are adjacent in
    memory; a pass per layer would stream the whole array once per layer), into per-block counts summed at
    the end."""
    n_tok, n_lay, k = experts.shape
    n_dev = load.shape[1]
    n_blk = (n_tok + DISTINCT_BLOCK - 1) // DISTINCT_BLOCK
    part_h = np.zeros((n_blk, n_lay, hist.shape[1]), dtype=np.int64)
    part_l = np.zeros((n_blk, n_lay, n_dev), dtype=np.int64)
    for b in prange(n_blk):
        seen = np.zeros(n_dev, dtype=np.int64)
        stamp = 0
        for t in range(b * DISTINCT_BLOCK, min((b + 1) * DISTINCT_BLOCK, n_tok)):
            for layer in range(n_lay):
                stamp += 1
                nd = 0
                for j in range(k):
                    d = dev[layer, experts[t, layer, j]]
                    part_l[b, layer, d] += 1
                    if seen[d] != stamp:
                        seen[d] = stamp
                        nd += 1
                part_h[b, layer, nd] += 1
    for b in range(n_blk):
        hist += part_h[b]
        load += part_l[b]


def route(table: np.ndarray, experts: np.ndarray, n_experts: int, max_enum: int = MAX_ENUM) -> tuple[np.ndarray, ...]:
    """Replay tokens through a placement.

    Parameters
    ----------
    table : [layers, D, slots] expert ids (-1 empty), a valid placement.
    experts : [tokens, layers, k] int expert ids, in token order.
    n_experts : E.
    max_enum : copy combinations enumerated per token before the greedy cover (see the module docstring).

    Returns
    -------
    hist : [layers, min(k, D) + 1] int64 tokens by number of distinct devices.
    load : [layers, D] int64 selections served by each device.
    """
    n_lay, n_dev, _ = table.shape
    if experts.ndim != 3 or experts.shape[1] != n_lay:
        raise UsageError(f"experts has shape {experts.shape}; expected [tokens, {n_lay}, k] for this placement")
    k = experts.shape[2]
    hist = np.zeros((n_lay, min(k, n_dev) + 1), dtype=np.int64)
    load = np.zeros((n_lay, n_dev), dtype=np.int64)
    cand, ncand = candidates(table, n_experts)
    if ncand.max() == 1:
        _distinct_single(experts, np.ascontiguousarray(cand[:, :, 0]), hist, load)
    else:
        _route(experts, cand, ncand, int(max_enum), hist, load)
    return hist, load


def load_cv(load: np.ndarray) -> np.ndarray:
    """[...] population std / mean of ``load [..., D]`` over its last axis (0 when the mean is 0)."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(axis=-1)
    return np.divide(load.std(axis=-1), mean, out=np.zeros_like(mean), where=mean > 0)


def max_mean(load: np.ndarray) -> np.ndarray:
    """[...] max / mean of ``load [..., D]`` over its last axis (1 when the mean is 0)."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(axis=-1)
    return np.divide(load.max(axis=-1), mean, out=np.ones_like(mean), where=mean > 0)


@dataclasses.dataclass(frozen=True, eq=False)
class PlacementScore:
    """A placement scored on one token set (see the module docstring for each figure).

    hist : [layers, min(k, D) + 1] int64 tokens by distinct devices; load : [layers, D] int64 selections;
    experts_per_device : [layers, D] int64 occupied slots; layer_ids : [layers].
    """

    layer_ids: np.ndarray
    tokens: int
    hist: np.ndarray
    load: np.ndarray
    experts_per_device: np.ndarray

    @property
    def devices_per_token(self) -> np.ndarray:
        """[layers] float64 mean distinct devices per token."""
        n = np.arange(self.hist.shape[1], dtype=np.float64)
        return (self.hist * n).sum(axis=1) / max(self.tokens, 1)

    @property
    def cv(self) -> np.ndarray:
        """[layers] float64 load CV across devices."""
        return load_cv(self.load)

    @property
    def max_mean(self) -> np.ndarray:
        """[layers] float64 max / mean device load."""
        return max_mean(self.load)

    @property
    def mean_devices(self) -> float:
        return float(self.devices_per_token.mean())

    @property
    def mean_cv(self) -> float:
        return float(self.cv.mean())

    @property
    def mean_max_mean(self) -> float:
        return float(self.max_mean.mean())

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "mean_devices_per_token": self.mean_devices,
            "mean_load_cv": self.mean_cv,
            "worst_load_cv": float(self.cv.max()),
            "mean_max_over_mean": self.mean_max_mean,
            "worst_max_over_mean": float(self.max_mean.max()),
            "max_experts_per_device": int(self.experts_per_device.max()),
            "device_count_share": (self.hist.sum(axis=0) / max(1, self.hist.sum())).tolist(),
            "layers": [
                {
                    "layer": int(lid),
                    "devices_per_token": float(self.devices_per_token[i]),
                    "load_cv": float(self.cv[i]),
                    "max_over_mean": float(self.max_mean[i]),
                    "hist": self.hist[i].tolist(),
                    "load": self.load[i].tolist(),
                    "experts_per_device": self.experts_per_device[i].tolist(),
                }
                for i, lid in enumerate(self.layer_ids.tolist())
            ],
        }


def score_placement(placement: Placement, trace: RoutingTrace) -> PlacementScore:
    """Replay `trace` (the held-out tokens) through `placement` and measure it.

    The trace's MoE layers and expert count must match the placement's.
    """
    if trace.n_experts != placement.n_experts or not np.array_equal(trace.layer_ids, placement.layer_ids):
        raise UsageError(
            f"the placement covers layers {placement.layer_ids.tolist()} x {placement.n_experts} experts but the "
            f"trace has layers {trace.layer_ids.tolist()} x {trace.n_experts}; score it on the trace it was made for"
        )
    hist, load = route(placement.table, trace.experts, placement.n_experts)
    return PlacementScore(placement.layer_ids, trace.n_tokens, hist, load, placement.experts_per_device())
