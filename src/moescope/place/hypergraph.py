"""Hypergraph partitioning of experts with Mt-KaHyPar (the optional ``[place]`` extra).

Per MoE layer: each distinct train top-k set is a hyperedge over its experts, weighted by how many tokens
chose it; each expert is a vertex weighted by its train load (selections, plus 1 so no weight is 0).
Minimising distinct devices per token is exactly the connectivity objective ``sum_h w_h (lambda_h - 1)``
(KM1) of a partition into D blocks; Mt-KaHyPar minimises it with block weights within ``(1 + epsilon)``
of the mean (a load balance, not a slot count). The partition is then repaired to the slot capacity
(`moescope.place.refine`, phase 0: the cheapest moves out of over-full devices).

`mtkahypar` is imported lazily, on the first partition; it is initialised once per process with the
thread count of the first call (its thread pool cannot be resized later). Partitions use the
DETERMINISTIC preset and are seeded (`mtkahypar.set_seed`), so a seed repeats its answer.

    >>> assign = partition_layer(sets, w, vertex_weight, n_devices=8, epsilon=0.03, seed=0)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moescope._jit import usable_cpus
from moescope.errors import require

_PROCESS: dict[str, Any] = {}  # Mt-KaHyPar's initializer is a process-wide singleton


def initializer(threads: int | None = None) -> Any:
    """The process's Mt-KaHyPar initializer, created on first use with `threads` (default: usable CPUs)."""
    if "init" not in _PROCESS:
        mtk = require("mtkahypar", "place", "the hypergraph placement")
        n = threads or usable_cpus()
        _PROCESS["init"] = mtk.initialize(int(n), False)
        _PROCESS["threads"] = int(n)
    return _PROCESS["init"]


def partition_layer(
    sets: np.ndarray,
    w: np.ndarray,
    vertex_weight: np.ndarray,
    n_devices: int,
    epsilon: float = 0.03,
    seed: int = 0,
    threads: int | None = None,
) -> np.ndarray:
    """Partition one layer's experts into `n_devices` blocks minimising connectivity (KM1).

    Parameters
    ----------
    sets : [H, k] int expert sets (hyperedges); w : [H] int64 tokens per set (hyperedge weights).
    vertex_weight : [E] int64 weight of each expert (train load + 1).
    n_devices : D blocks. epsilon : allowed block-weight imbalance over the mean.
    seed : Mt-KaHyPar's random seed. threads : threads of the process-wide initializer (first call only).

    Returns
    -------
    [E] int64 block (device) of each expert; block sizes are not bounded (repair them afterwards).
    """
    mtk = require("mtkahypar", "place", "the hypergraph placement")
    init = initializer(threads)
    n_exp = int(vertex_weight.shape[0])
    if n_devices == 1:
        return np.zeros(n_exp, dtype=np.int64)
    ctx = init.context_from_preset(mtk.PresetType.DETERMINISTIC)
    ctx.set_partitioning_parameters(int(n_devices), float(epsilon), mtk.Objective.KM1)
    ctx.logging = False
    mtk.set_seed(int(seed))
    hg = init.create_hypergraph(
        ctx, n_exp, int(sets.shape[0]), sets.tolist(), vertex_weight.astype(np.int64).tolist(), w.tolist()
    )
    part = hg.partition(ctx)
    return np.asarray(part.get_partition(), dtype=np.int64)
