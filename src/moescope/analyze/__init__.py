"""Routing analyses: pure functions from counts or traces to typed results (each with `to_dict()`).

- `concentration`: the "should we build a per-expert cache?" gate (coverage, entropy, Gini per layer);
- `rank_experts` / `group_mass`: per-layer rankings (CSV for split and placement) and what an expert subset keeps;
- `locality`: next-token reuse vs shuffles, reuse distances, working sets, cross-layer predictability and
  prefetch hit rates with a train/test split (`moescope.analyze.prefetch` holds the predictors).

    >>> from moescope.analyze import concentration
    >>> concentration(trace.counts()).cache_helps
"""

from moescope.analyze.concentration import Concentration, LayerConcentration, concentration
from moescope.analyze.locality import LayerLocality, Locality, locality
from moescope.analyze.ranking import (
    GroupMass,
    Ranking,
    group_mass,
    rank_experts,
    read_ranking_csv,
    write_ranking_csv,
)

__all__ = [
    "Concentration",
    "GroupMass",
    "LayerConcentration",
    "LayerLocality",
    "Locality",
    "Ranking",
    "concentration",
    "group_mass",
    "locality",
    "rank_experts",
    "read_ranking_csv",
    "write_ranking_csv",
]
