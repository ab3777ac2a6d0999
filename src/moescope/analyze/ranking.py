"""Per-layer expert rankings and the routing mass an expert group keeps.

- `rank_experts`: every layer's experts ordered hottest first, by selections or by gate mass, with both
  figures and the share; written as CSV (``layer,expert,rank,count,gate_mass,share``), the ranking the
  split and placement commands read. Rankings are per layer: expert 5 of layer 3 and expert 5 of layer 4
  are different experts, never pooled by id.
- `group_mass`: for a chosen expert subset per layer, the share of routing selections that land inside
  it and the share of tokens whose whole top-k lies inside it (what an expert-split group serving only
  that subset could answer without help).

No I/O except `write_ranking_csv` (atomic). Pure numpy.

    >>> ranking = rank_experts(trace, by="counts")
    >>> group_mass(trace, {lid: ranking.top(lid, 8) for lid in trace.layer_ids})
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope import _atomic
from moescope.errors import UsageError
from moescope.trace import ExpertCounts, RoutingTrace, expert_mass

CSV_HEADER = ("layer", "expert", "rank", "count", "gate_mass", "share")
RANK_BY = ("counts", "gate")


@dataclasses.dataclass(frozen=True)
class Ranking:
    """order: [layers, experts] expert ids hottest first; counts / gate_mass: [layers, experts] by expert id."""

    layer_ids: np.ndarray
    order: np.ndarray
    counts: np.ndarray
    gate_mass: np.ndarray | None
    by: str

    def top(self, layer_id: int, n: int) -> list[int]:
        """The `n` hottest experts of model layer `layer_id`."""
        pos = np.flatnonzero(self.layer_ids == layer_id)
        if pos.size == 0:
            raise UsageError(f"layer {layer_id} is not ranked; layers are {self.layer_ids.tolist()}")
        return self.order[pos[0], :n].tolist()

    def rows(self) -> list[tuple[int, int, int, int, float | None, float]]:
        """(layer, expert, rank, count, gate_mass, share) in layer order, rank 1 first."""
        key = self.counts if self.by == "counts" else self.gate_mass
        totals = key.sum(axis=1)
        out = []
        for i, lid in enumerate(self.layer_ids.tolist()):
            for r, e in enumerate(self.order[i].tolist(), 1):
                gm = None if self.gate_mass is None else float(self.gate_mass[i, e])
                share = float(key[i, e] / totals[i]) if totals[i] > 0 else 0.0
                out.append((int(lid), int(e), r, int(self.counts[i, e]), gm, share))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"by": self.by, "rows": [dict(zip(CSV_HEADER, row, strict=True)) for row in self.rows()]}


def rank_experts(data: RoutingTrace | ExpertCounts, by: str = "counts") -> Ranking:
    """Rank each layer's experts by selections (``by="counts"``) or gate mass (``by="gate"``).

    Ties are broken by expert id (stable), so a ranking is deterministic.
    """
    if by not in RANK_BY:
        raise UsageError(f"rank by {by!r}: expected one of {', '.join(RANK_BY)}")
    if isinstance(data, RoutingTrace):
        counts = expert_mass(data.experts, data.n_experts)
        gate = None if data.weights is None else expert_mass(data.experts, data.n_experts, data.weights)
        layer_ids = data.layer_ids
    else:
        if data.mass != "counts" or data.normalized:
            raise UsageError(
                "ranking needs selection counts; this input holds "
                + ("shares" if data.normalized else "gate mass")
                + ": give the trace, or counts with mass 'counts'"
            )
        counts, gate, layer_ids = data.values, None, data.layer_ids
    if by == "gate" and gate is None:
        raise UsageError("--by gate needs gate weights, which this input lacks; use --by counts")
    key = counts if by == "counts" else gate
    order = np.argsort(-key, axis=1, kind="stable")
    return Ranking(np.asarray(layer_ids), order, np.asarray(counts, dtype=np.int64), gate, by)


def write_ranking_csv(ranking: Ranking, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``layer,expert,rank,count,gate_mass,share`` rows (gate_mass empty when unknown), atomically."""
    buf = io.StringIO()
    buf.write(",".join(CSV_HEADER) + "\n")
    for layer, expert, rank, count, gm, share in ranking.rows():
        buf.write(f"{layer},{expert},{rank},{count},{'' if gm is None else repr(gm)},{share!r}\n")
    return _atomic.write_text_atomic(path, buf.getvalue(), overwrite)


@dataclasses.dataclass(frozen=True)
class GroupMass:
    """Per layer: selections inside the group / all selections, and tokens with all k inside / all tokens."""

    layer_ids: tuple[int, ...]
    group_size: tuple[int, ...]
    mass_share: tuple[float, ...]
    full_token_share: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def group_mass(trace: RoutingTrace, groups: Mapping[int, Sequence[int]]) -> GroupMass:
    """Routing mass and whole-token coverage of an expert subset per layer.

    Parameters
    ----------
    trace : the routing to score.
    groups : model layer id -> expert ids in the group (every layer of the trace must be given).
    """
    missing = [int(lid) for lid in trace.layer_ids if int(lid) not in groups]
    if missing:
        raise UsageError(f"no expert group given for layer(s) {missing}; give one subset per MoE layer")
    sizes, mass, full = [], [], []
    for i, lid in enumerate(trace.layer_ids.tolist()):
        members = np.zeros(trace.n_experts, dtype=bool)
        ids = np.asarray(list(groups[lid]), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= trace.n_experts):
            raise UsageError(f"layer {lid}: expert ids {ids.tolist()} outside 0..{trace.n_experts - 1}")
        members[ids] = True
        inside = members[trace.experts[:, i, :]]  # [tokens, k] bool
        sizes.append(int(members.sum()))
        mass.append(float(inside.mean()) if inside.size else 0.0)
        full.append(float(inside.all(axis=1).mean()) if inside.size else 0.0)
    return GroupMass(tuple(int(x) for x in trace.layer_ids), tuple(sizes), tuple(mass), tuple(full))
