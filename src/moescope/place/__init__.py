"""Static expert placement across devices: which device holds which expert, per MoE layer.

For expert-parallel or sharded serving with a fixed expert -> device map (no dynamic cache), each token's
hidden state goes to every distinct device holding one of its k experts: fewer distinct devices per token
is less all-to-all traffic, but a device that serves more than its share makes the others wait. Methods
are fitted on the train split of a trace (first half of every sequence) and always scored on the held-out
split (second halves), side by side with standard load balancing (``frequency``).

Glossary:

- **device**: one of D GPUs (or ranks) holding a slice of every MoE layer's experts.
- **slot**: room for one expert on one device; ``ceil(E / D) + ceil(R / D)`` per device per layer.
- **replica**: an extra copy of an expert (R per layer); the expert's copies are its *physical* experts,
  the expert itself the *logical* one (``phy2log`` / ``log2phy`` / ``logcnt``, as in EPLB).
- **distinct devices per token**: how many devices serve a token's k experts at one layer.
- **load**: routing selections (token-expert pairs) a device serves; **load CV** = std / mean over devices.
- **drift**: the change of expert loads between earlier and later tokens of the same sequences.

Modules: `layout` (the `Placement` table and EPLB arrays), `metrics` (scoring, parallel numba kernels),
`data` (train tables), `methods` (the registry `METHODS`), `refine` (local search kernels), `hypergraph`
(Mt-KaHyPar, optional), `replicas`, `compare` (what ``moescope place`` runs), `export` (files).

    >>> from moescope.place import compare_placements
    >>> report = compare_placements(trace, devices=[4, 8], methods=["frequency", "coact-refined"])
    >>> report.row(8, "coact-refined").vs_frequency     # e.g. -0.21
"""

from moescope.place.compare import PlacementReport, PlacementRow, compare_placements
from moescope.place.data import TrainData
from moescope.place.export import read_placement, write_eplb_map, write_placement
from moescope.place.layout import Placement, slot_capacity
from moescope.place.methods import METHODS, PlacementMethod, PlaceParams
from moescope.place.metrics import PlacementScore, route, score_placement
from moescope.place.replicas import add_replicas

__all__ = [
    "METHODS",
    "PlaceParams",
    "Placement",
    "PlacementMethod",
    "PlacementReport",
    "PlacementRow",
    "PlacementScore",
    "TrainData",
    "add_replicas",
    "compare_placements",
    "read_placement",
    "route",
    "score_placement",
    "slot_capacity",
    "write_eplb_map",
    "write_placement",
]
