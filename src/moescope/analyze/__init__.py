"""Routing analyses: pure functions from counts or traces to typed results (each with `to_dict()`).

- `concentration`: the "should we build a per-expert cache?" gate (coverage, entropy, Gini per layer);
- `rank_experts` / `group_mass`: per-layer rankings (CSV for split and placement) and what an expert subset keeps;
- `coactivation`: co-activation matrices, balanced clustering and its gain against a marginal-preserving
  null (real pairwise structure vs a clustering artefact);
- `locality`: next-token reuse vs shuffles, reuse distances, working sets, cross-layer predictability and
  prefetch hit rates with a train/test split (`moescope.analyze.prefetch` holds the predictors).

    >>> from moescope.analyze import concentration
    >>> concentration(trace.counts()).cache_helps
"""

from moescope.analyze.coact import (
    Coactivation,
    GainParts,
    LayerCoact,
    balanced_groups,
    clustering_gain,
    coact_counts,
    coactivation,
    write_coact_npz,
)
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
    "Coactivation",
    "Concentration",
    "GainParts",
    "GroupMass",
    "LayerCoact",
    "LayerConcentration",
    "LayerLocality",
    "Locality",
    "Ranking",
    "balanced_groups",
    "clustering_gain",
    "coact_counts",
    "coactivation",
    "concentration",
    "group_mass",
    "locality",
    "rank_experts",
    "read_ranking_csv",
    "write_coact_npz",
    "write_ranking_csv",
]
