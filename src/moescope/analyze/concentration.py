"""The concentration gate: is routing skewed enough that keeping a few hot experts resident pays?

Per layer, from the share of routing mass each expert receives (selections, or gate weight):

- ``hot_frac_for_coverage``: the fraction of experts that must be resident, hottest first, to cover
  ``coverage`` (default 0.90) of the layer's routing mass;
- ``concentration_score``: ``1 - H(shares) / log(E)``, 0 for uniform routing, 1 when one expert takes all;
- ``top_share``: the hottest expert's share; ``gini``: the Gini coefficient of the shares.

Overall, the median ``hot_frac_for_coverage`` over layers; the verdict ``cache_helps`` is that median
being below ``threshold`` (default 0.25: a quarter of the experts carry 90% of the mass). This is a
frequency view: it says nothing about temporal reuse (see locality) nor about what a cache of a given
size achieves under a real policy (see the cache simulator); a flat layer can still cache well if its
tokens reuse experts, and a skewed one can thrash. No I/O here.

    >>> result = concentration(trace.counts(), coverage=0.9, threshold=0.25)
    >>> result.median_hot_frac, result.cache_helps
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moescope.errors import UsageError
from moescope.trace import ExpertCounts

DEFAULT_COVERAGE = 0.90
DEFAULT_THRESHOLD = 0.25


@dataclasses.dataclass(frozen=True)
class LayerConcentration:
    layer: int
    hot_experts: int  # experts needed, hottest first, for the coverage target
    hot_frac_for_coverage: float
    concentration_score: float
    top_share: float
    gini: float


@dataclasses.dataclass(frozen=True)
class Concentration:
    """The gate's result: per-layer rows, the median hot fraction and the verdict."""

    layers: tuple[LayerConcentration, ...]
    n_experts: int
    coverage: float
    threshold: float
    mass: str
    model: str | None
    median_hot_frac: float
    median_concentration: float
    cache_helps: bool

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = [dataclasses.asdict(r) for r in self.layers]
        return d


def hot_experts(shares: np.ndarray, coverage: float) -> np.ndarray:
    """[layers] int: experts needed, hottest first, to reach `coverage` of each row of ``shares [layers, E]``."""
    cum = np.cumsum(-np.sort(-shares, axis=1), axis=1)
    # a tiny tolerance so that e.g. 0.9 of a row summing to 1 +- rounding is reached where it should be
    return (cum < coverage - 1e-9).sum(axis=1) + 1


def concentration_scores(shares: np.ndarray) -> np.ndarray:
    """[layers] float: ``1 - entropy / log(E)`` of each row of ``shares [layers, E]`` (E = 1 gives 1)."""
    n = shares.shape[1]
    if n == 1:
        return np.ones(shares.shape[0])
    logs = np.log(shares, out=np.zeros_like(shares), where=shares > 0)
    entropy = -(shares * logs).sum(axis=1)
    return 1.0 - entropy / np.log(n)


def gini(shares: np.ndarray) -> np.ndarray:
    """[layers] float: Gini coefficient of each row of ``shares [layers, E]`` (0 equal, -> 1 one expert)."""
    n = shares.shape[1]
    x = np.sort(shares, axis=1)
    total = x.sum(axis=1)
    rank = np.arange(1, n + 1, dtype=np.float64)
    g = 2.0 * (x * rank).sum(axis=1) / (n * np.where(total > 0, total, 1.0)) - (n + 1.0) / n
    return np.where(total > 0, g, 0.0)


def concentration(
    counts: ExpertCounts,
    *,
    coverage: float = DEFAULT_COVERAGE,
    threshold: float = DEFAULT_THRESHOLD,
    model: str | None = None,
) -> Concentration:
    """Run the concentration gate on per-layer expert mass.

    Parameters
    ----------
    counts : ``[layers, experts]`` selections or gate mass (or shares); a trace's ``trace.counts(mass)``.
    coverage : the share of routing mass the resident experts must cover, in (0, 1].
    threshold : ``cache_helps`` when the median hot fraction is below this, in (0, 1].
    model : a name for the report (default: the counts' metadata).

    Returns
    -------
    `Concentration` with one `LayerConcentration` per layer, in the counts' layer order.
    """
    for name, value in (("coverage", coverage), ("threshold", threshold)):
        if not 0 < value <= 1:
            raise UsageError(f"--{name} is {value}; expected a fraction in (0, 1], e.g. 0.9")
    shares = counts.shares()
    empty = np.flatnonzero(shares.sum(axis=1) == 0)
    if empty.size:
        raise UsageError(
            f"layer {int(counts.layer_ids[empty[0]])} has no routing mass; drop it (--moe-layers) or check the source"
        )
    hot = hot_experts(shares, coverage)
    frac = hot / counts.n_experts
    score = concentration_scores(shares)
    gin = gini(shares)
    rows = tuple(
        LayerConcentration(
            int(lid), int(hot[i]), float(frac[i]), float(score[i]), float(shares[i].max()), float(gin[i])
        )
        for i, lid in enumerate(counts.layer_ids.tolist())
    )
    median_hot = float(np.median(frac))
    return Concentration(
        layers=rows,
        n_experts=counts.n_experts,
        coverage=float(coverage),
        threshold=float(threshold),
        mass=counts.mass,
        model=model or counts.meta.model,
        median_hot_frac=median_hot,
        median_concentration=float(np.median(score)),
        cache_helps=median_hot < threshold,
    )
