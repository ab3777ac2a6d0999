"""Replicas: R extra copies of the hottest experts per layer, added on top of any placement (the EPLB idea).

Which experts get copies (EPLB's rule): R times, the expert with the largest train load per copy gets one
more copy (ties: lower id), skipping an expert already on every device with a free slot. Where each copy
goes: the device with a free slot, not already holding that expert, whose experts are most often chosen
together with it on train tokens (co-activation with the device's experts, so the copy serves tokens
locally); ties go to the device with the least expected load (each expert's train load split evenly over
its copies), then the lower id.

Capacity: ``slots = ceil(E / D) + ceil(R / D)`` per device; the base placement uses at most ``ceil(E / D)``
of them. A device with a free slot always lacks some expert, so all R copies are placed. Which copy
serves a token is decided online by the scorer (`moescope.place.metrics`). No I/O.

    >>> table = add_replicas(assign, data, n_devices=8, replicas=8)    # [layers, 8, slots]
"""

from __future__ import annotations

import numpy as np

from moescope.place.data import TrainData
from moescope.place.layout import check_devices, slot_capacity


def _replicate(assign: np.ndarray, load: np.ndarray, coact: np.ndarray, n_dev: int, replicas: int, slots: int):
    """``[D, slots]`` table: ``assign [E]``'s experts, then R copies (module rules); -1 for empty slots."""
    n_exp = assign.shape[0]
    held: list[list[int]] = [[] for _ in range(n_dev)]
    for e in range(n_exp):
        held[int(assign[e])].append(e)
    copies = np.ones(n_exp, dtype=np.int64)
    for _ in range(replicas):
        # largest load per copy first (ties: lower id); skip an expert whose copy fits nowhere
        for e in sorted(range(n_exp), key=lambda x: (-load[x] / copies[x], x)):
            room = [d for d in range(n_dev) if len(held[d]) < slots and e not in held[d]]
            if room:
                break
        share = load / copies
        best = min(room, key=lambda d: (-float(coact[e, held[d]].sum()), float(share[held[d]].sum()), d))
        held[best].append(e)
        copies[e] += 1
    table = np.full((n_dev, slots), -1, dtype=np.int32)
    for d in range(n_dev):
        table[d, : len(held[d])] = held[d]
    return table


def add_replicas(assign: np.ndarray, data: TrainData, n_devices: int, replicas: int) -> np.ndarray:
    """A placement table with `replicas` extra copies per layer on top of ``assign [layers, E]``.

    Parameters
    ----------
    assign : [layers, E] device of each expert, at most ``ceil(E / D)`` per device.
    data : the train routing (loads and co-activation decide the copies).
    n_devices : D. replicas : R, extra copies per layer.

    Returns
    -------
    [layers, D, ceil(E / D) + ceil(R / D)] int32 expert ids, -1 for empty slots.
    """
    check_devices(n_devices, data.n_experts, replicas)
    slots = slot_capacity(data.n_experts, n_devices, replicas)
    table = np.full((assign.shape[0], n_devices, slots), -1, dtype=np.int32)
    load = data.load.astype(np.float64)
    coact = data.coact
    for layer in range(assign.shape[0]):
        table[layer] = _replicate(assign[layer].astype(np.int64), load[layer], coact[layer], n_devices, replicas, slots)
    return table
