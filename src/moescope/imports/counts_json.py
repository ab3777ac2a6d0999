"""Counts JSON: per-layer, per-expert totals without token order.

Accepted shapes:
- ``{"model", "n_experts", "top_k", "layers": [[...], ...], "layer_ids", "normalized", "tokens",
  "mass", "layers_gate_weighted", ...}`` (the format of ``shared/realdata/*/counts*.json``);
- a plain ``[[...], ...]`` layers x experts list of lists.

Other scalar keys are kept as metadata. Writing uses the first shape; integers stay integers and floats
are written with Python's shortest round-trip repr, so counts -> JSON -> counts is exact.

    >>> counts = read_counts_json(Path("counts.json"), ImportOptions(mass="gate"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moescope import _atomic
from moescope.errors import FormatError, UsageError
from moescope.imports.registry import ImportOptions, register_reader, register_writer
from moescope.trace import ExpertCounts, RoutingTrace

KNOWN_KEYS = (
    "n_experts",
    "top_k",
    "layers",
    "layer_ids",
    "normalized",
    "tokens",
    "mass",
    "layers_gate_weighted",
)


def _is_table(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(r, list) for r in x)


def _looks_like_counts(path: Path) -> bool:
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return _is_table(doc) or (isinstance(doc, dict) and "layers" in doc)


@register_reader(
    "counts-json",
    description="per-layer per-expert counts or shares as JSON (no token order)",
    detect=_looks_like_counts,
    options=("n_experts", "top_k", "model", "mass"),
    produces="counts",
)
def read_counts_json(path: Path, options: ImportOptions) -> ExpertCounts:
    """Read a counts JSON file into `ExpertCounts`."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc}); check the file") from None
    if _is_table(doc):
        doc = {"layers": doc}
    if not isinstance(doc, dict) or "layers" not in doc:
        raise FormatError(
            f"{path}: expected an object with a 'layers' table or a plain [[...], ...] layers x experts list, "
            f"got {type(doc).__name__}"
        )
    mass = options.mass or doc.get("mass", "counts")
    if options.mass == "counts" and doc.get("mass") == "gate":
        raise UsageError(f"{path}: holds gate mass, not selection counts; drop --mass counts or use --mass gate")
    key = "layers"
    if options.mass == "gate" and doc.get("mass") != "gate":
        if "layers_gate_weighted" not in doc:
            raise UsageError(f"{path}: --mass gate needs a 'layers_gate_weighted' table, which this file lacks")
        key = "layers_gate_weighted"
    table = doc[key]
    if not _is_table(table):
        raise FormatError(f"{path}: '{key}' must be a list of per-layer lists, got {str(table)[:60]!r}")
    for i, row in enumerate(table):
        bad = [v for v in row if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise FormatError(f"{path}: '{key}' row {i} holds non-numbers such as {bad[0]!r}; values must be numbers")
    n_experts = options.n_experts or doc.get("n_experts")
    top_k = options.top_k or doc.get("top_k")
    meta = {k: v for k, v in doc.items() if k not in KNOWN_KEYS and not _is_table(v)}
    if options.model:
        meta["model"] = options.model
    meta.setdefault("source", str(path))
    normalized = bool(doc.get("normalized", False))
    return ExpertCounts(
        table,
        n_experts,
        top_k=top_k,
        tokens=doc.get("tokens"),
        layer_ids=doc.get("layer_ids"),
        normalized=normalized,
        mass=mass,
        meta=meta,
    )


@register_writer(
    "counts-json",
    description="counts JSON (a trace is counted first)",
    suffixes=(".json",),
    accepts=("trace", "counts"),
)
def write_counts_json(data: ExpertCounts | RoutingTrace, path: Path, overwrite: bool = False) -> Path:
    """Write counts (a trace is reduced to selection counts) as JSON, atomically."""
    counts = data.counts() if isinstance(data, RoutingTrace) else data
    doc: dict[str, Any] = {
        **counts.meta.to_dict(),
        "n_experts": counts.n_experts,
        "top_k": counts.top_k,
        "tokens": counts.tokens,
        "layer_ids": counts.layer_ids.tolist(),
        "normalized": counts.normalized,
        "mass": counts.mass,
        "layers": counts.values.tolist(),
    }
    return _atomic.write_text_atomic(path, json.dumps(doc) + "\n", overwrite)
