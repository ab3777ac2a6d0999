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
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope import _atomic
from moescope.errors import FormatError, UsageError
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


def read_ranking_csv(path: str | Path) -> Ranking:
    """Read a ranking CSV written by `write_ranking_csv` (or by hand: ``layer,expert,rank`` at least;
    ``count`` and ``gate_mass`` optional). Every layer must rank the same experts 0..E-1, each once."""
    import csv

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"ranking {str(p)!r} does not exist; write one with `moescope rank TRACE -o ranking.csv`")
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            rows = _ranking_rows(csv.DictReader(fh), p)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FormatError(
            f"ranking {str(p)!r} is not a CSV text file ({type(exc).__name__}: {exc}); write one with "
            "`moescope rank TRACE -o ranking.csv`"
        ) from None
    if not rows:
        raise UsageError(f"ranking {str(p)!r} has no rows")
    sizes = {len(v) for v in rows.values()}
    n_experts = max(sizes)
    for layer, entries in rows.items():
        experts = sorted(e for _, e, _, _ in entries)
        if experts != list(range(n_experts)):
            raise UsageError(
                f"ranking {str(p)!r} layer {layer} ranks experts {experts[:8]}{'...' if len(experts) > 8 else ''}, "
                f"expected each of 0..{n_experts - 1} exactly once; rewrite it with `moescope rank`"
            )
    layer_ids = np.array(sorted(rows), dtype=np.int64)
    order = np.array([[e for _, e, _, _ in sorted(rows[lid])] for lid in layer_ids], dtype=np.int64)
    counts = np.zeros((len(layer_ids), n_experts), dtype=np.int64)
    gate = np.zeros((len(layer_ids), n_experts), dtype=np.float64)
    has_gate = True
    for i, lid in enumerate(layer_ids):
        for _, e, cnt, gm in rows[lid]:
            counts[i, e] = cnt
            has_gate = has_gate and gm is not None
            gate[i, e] = gm or 0.0
    return Ranking(layer_ids, order, counts, gate if has_gate else None, "counts")


def _ranking_rows(reader: Any, p: Path) -> dict[int, list[tuple[int, int, int, float | None]]]:
    """Rows of a ranking CSV by layer: (rank, expert, count, gate mass or None); numbers checked."""
    missing = {"layer", "expert", "rank"} - set(reader.fieldnames or ())
    if missing:
        raise UsageError(
            f"ranking {str(p)!r} lacks column(s) {sorted(missing)}; expected a header "
            f"{','.join(CSV_HEADER)} (as `moescope rank -o` writes)"
        )
    rows: dict[int, list[tuple[int, int, int, float | None]]] = {}
    for n, row in enumerate(reader, 2):
        try:
            layer, expert, rank = int(row["layer"]), int(row["expert"]), int(row["rank"])
            count = int(row["count"]) if row.get("count") not in (None, "") else 0
            gm = float(row["gate_mass"]) if row.get("gate_mass") not in (None, "") else None
        except (TypeError, ValueError):
            raise UsageError(
                f"ranking {str(p)!r} line {n}: {str(dict(row))[:200]} is not numeric where it must be (or a "
                "column is missing)"
            ) from None
        if min(layer, expert, rank, count) < 0 or max(layer, expert, rank, count) >= 1 << 31:
            raise UsageError(f"ranking {str(p)!r} line {n}: layer, expert, rank and count must be in 0..2^31-1")
        if gm is not None and not math.isfinite(gm):
            raise UsageError(f"ranking {str(p)!r} line {n}: gate_mass {gm!r} is not a finite number")
        rows.setdefault(layer, []).append((rank, expert, count, gm))
    return rows


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


def read_groups_file(path: str | Path) -> list[dict[int, list[int]]]:
    """Expert subsets per layer from ``{"groups": [{"<layer>": [expert ids], ...}, ...]}`` (one object per
    group; layers are model layer ids, the GGUF block numbers): what `group_mass` scores and `moescope split
    --mode custom` writes. Checking the ids against a model or trace is the caller's."""
    from moescope.imports.registry import parse_json

    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"--groups-file {str(p)!r} cannot be read ({exc.strerror}); check the path") from None
    doc = parse_json(text, f"--groups-file {str(p)!r}")  # UTF-8, valid, bounded nesting: else one FormatError
    raw = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(raw, list) or not raw or not all(isinstance(g, dict) for g in raw):
        raise UsageError(
            f'--groups-file {str(p)!r}: expected {{"groups": [{{"<layer>": [expert ids], ...}}, ...]}} with '
            f"one object per group"
        )
    groups = []
    for gi, g in enumerate(raw):
        ok = all(isinstance(v, list) and all(_is_id(x) for x in v) for v in g.values())
        try:
            layers = [int(b) for b in g]
        except ValueError:
            ok = False
        if not ok or any(b < 0 for b in layers):
            raise UsageError(
                f"--groups-file {str(p)!r} group {gi}: keys must be layer numbers and values lists of integer "
                'expert ids, e.g. {"3": [0, 5, 7]}'
            )
        groups.append({int(b): [int(x) for x in v] for b, v in g.items()})
    return groups


def _is_id(x: Any) -> bool:
    """A JSON expert id: an integer (not a bool, not a float like 1.5), 0 .. 2^31-1."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 31
