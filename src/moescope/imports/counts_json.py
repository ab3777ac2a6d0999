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
import math
from pathlib import Path
from typing import Any

from moescope import _atomic
from moescope.errors import FormatError, UsageError
from moescope.imports.registry import (
    INT64_MAX,
    ImportOptions,
    brief,
    check_meta_strings,
    json_int,
    parse_json,
    register_reader,
    register_writer,
    short,
)
from moescope.trace import MASS_KINDS, MAX_EXPERTS, ExpertCounts, RoutingTrace

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


def _read(path: Path) -> Any:
    """The parsed JSON document of `path` (see `parse_json` for what is refused)."""
    try:
        data = path.read_bytes()
    except OSError as exc:  # a folder, a permission error...
        raise FormatError(f"{path} cannot be read ({brief(exc)}); give a counts JSON file") from None
    return parse_json(data, str(path))


def _looks_like_counts(path: Path) -> bool:
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        doc = _read(path)
    except FormatError:
        return False
    return _is_table(doc) or (isinstance(doc, dict) and "layers" in doc)


def _check_table(table: Any, key: str, path: Path) -> list[list[int | float]]:
    """`table` checked as a list of per-layer lists of numbers; ints must fit int64, and so must each row's sum
    (the counts are summed per layer as int64)."""
    if not _is_table(table):
        raise FormatError(f"{path}: '{key}' must be a list of per-layer lists, got {short(table)}")
    for i, row in enumerate(table):
        bad = [v for v in row if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise FormatError(
                f"{path}: '{key}' row {i} holds non-numbers such as {short(bad[0])}; values must be numbers"
            )
        ints = [v for v in row if isinstance(v, int)]
        if ints and (max(ints) > INT64_MAX or sum(v for v in ints if v > 0) > INT64_MAX):
            raise FormatError(
                f"{path}: '{key}' row {i} holds {short(max(ints))} (row sum {short(sum(ints))}), beyond the 64-bit "
                f"range of counts; the file is damaged"
            )
        if len(ints) < len(row) and not math.isfinite(sum(float(v) for v in row if v > 0)):
            raise FormatError(f"{path}: '{key}' row {i} sums to infinity; values must be finite numbers")
    return table


def _optional(doc: dict[str, Any], key: str, path: Path, lo: int, hi: int) -> int | None:
    return None if doc.get(key) is None else json_int(doc[key], f"{path}: '{key}'", lo, hi)


@register_reader(
    "counts-json",
    description="per-layer per-expert counts or shares as JSON (no token order)",
    detect=_looks_like_counts,
    options=("n_experts", "top_k", "model", "mass"),
    produces="counts",
)
def read_counts_json(path: Path, options: ImportOptions) -> ExpertCounts:
    """Read a counts JSON file into `ExpertCounts`; a key of the wrong type at any level is a `FormatError`."""
    doc = _read(path)
    if _is_table(doc):
        doc = {"layers": doc}
    if not isinstance(doc, dict) or "layers" not in doc:
        raise FormatError(
            f"{path}: expected an object with a 'layers' table or a plain [[...], ...] layers x experts list, "
            f"got {type(doc).__name__}"
        )
    if doc.get("mass") is not None and doc["mass"] not in MASS_KINDS:
        raise FormatError(f"{path}: 'mass' is {short(doc['mass'])}, expected one of {', '.join(MASS_KINDS)}")
    if doc.get("normalized") is not None and not isinstance(doc["normalized"], bool):
        raise FormatError(f"{path}: 'normalized' is {short(doc['normalized'])}, expected true or false")
    mass = options.mass or doc.get("mass") or "counts"
    if options.mass == "counts" and doc.get("mass") == "gate":
        raise UsageError(f"{path}: holds gate mass, not selection counts; drop --mass counts or use --mass gate")
    key = "layers"
    if options.mass == "gate" and doc.get("mass") != "gate":
        if "layers_gate_weighted" not in doc:
            raise UsageError(f"{path}: --mass gate needs a 'layers_gate_weighted' table, which this file lacks")
        key = "layers_gate_weighted"
    table = _check_table(doc[key], key, path)
    n_experts = options.n_experts or _optional(doc, "n_experts", path, 1, MAX_EXPERTS)
    top_k = options.top_k or _optional(doc, "top_k", path, 1, MAX_EXPERTS)
    tokens = _optional(doc, "tokens", path, 0, INT64_MAX // (top_k or 1))  # tokens x top_k is compared as int64
    layer_ids = doc.get("layer_ids")
    if layer_ids is not None:
        if not isinstance(layer_ids, list):
            raise FormatError(f"{path}: 'layer_ids' is {short(layer_ids)}, expected a list of layer indices")
        layer_ids = [json_int(x, f"{path}: 'layer_ids' entry") for x in layer_ids]
    meta = {k: v for k, v in doc.items() if k not in KNOWN_KEYS and not _is_table(v)}
    check_meta_strings(meta, str(path))
    if options.model:
        meta["model"] = options.model
    meta.setdefault("source", str(path))
    return ExpertCounts(
        table,
        n_experts,
        top_k=top_k,
        tokens=tokens,
        layer_ids=layer_ids,
        normalized=bool(doc.get("normalized")),
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
