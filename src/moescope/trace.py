"""The routing data model: `RoutingTrace` (per-token expert choices) and `ExpertCounts` (aggregates).

Shapes (the glossary is in the package docstring):

- ``experts: [tokens, layers, k] int16`` -- the expert ids each token was routed to at each MoE layer,
  in the order the model emitted them (slot 0 is not necessarily the highest weight).
- ``weights: [tokens, layers, k] float16 | float32`` (optional) -- the gate weight of each chosen expert.
- ``seq_starts: [sequences] int64`` -- token index where each sequence (request, document) begins;
  ``seq_starts[0] == 0``, strictly increasing. Inside a sequence, tokens are in processing order.
- ``seq_labels: [sequences] str`` (optional) -- a workload / task / domain label per sequence.
- ``extras`` (optional per-token arrays, `EXTRAS`): ``token_ids [tokens] int32`` (the vocabulary id of each
  token, so two traces of the same text can be checked to be aligned: `moescope compare`),
  ``lookahead [tokens, layers, distance, k] int16`` (what the routers of the next MoE layers choose from the
  hidden state entering this layer's router, -1 past the last layer), ``candidates [tokens, layers, M]
  int16`` and ``candidate_probs [tokens, layers, M] float32`` (the router's top-M experts and their
  probabilities: the near misses). Every extra has the token axis first; layered ones have the layer axis
  second, so slices and layer selections carry them.
- ``layer_ids: [layers] int64`` -- the model's layer index of each MoE layer (dense layers are absent).
- ``ExpertCounts.values: [layers, experts]`` -- selections (or gate mass) per expert; shares when
  ``normalized``.

Validation happens at construction; every error names the token / layer / value and the fix.
This module does no I/O (see `moescope.store` and `moescope.imports`) and no analysis.

    >>> trace = RoutingTrace(experts, n_experts=64, seq_starts=[0, 120], layer_ids=range(1, 27))
    >>> trace.counts().values.shape   # (26, 64)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from moescope._jit import njit
from moescope.errors import TraceError

PHASES = ("prefill", "decode")
MASS_KINDS = ("counts", "gate")
EXPERT_DTYPE = np.dtype(np.int16)
TOKEN_DTYPE = np.dtype(np.int32)
WEIGHT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
MAX_EXPERTS = int(np.iinfo(np.int16).max) + 1
_VALIDATE_BLOCK = 1 << 16  # tokens checked per block, to bound temporary memory


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (seconds), for `TraceMeta.created`."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


@dataclasses.dataclass(frozen=True)
class TraceMeta:
    """Where a trace or counts came from. All fields optional; `extra` keeps any other JSON-able facts."""

    model: str | None = None
    source: str | None = None
    corpus: str | None = None
    created: str | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("model", "source", "corpus", "created")}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TraceMeta:
        d = dict(d or {})
        known = {k: d.pop(k, None) for k in ("model", "source", "corpus", "created")}
        return cls(**known, extra=d)

    def replace(self, **changes: Any) -> TraceMeta:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# validation kernels


@njit
def _first_bad_selection(experts, n_experts):
    """Scan ``experts: [tokens, layers, k]`` for the first out-of-range or repeated id.

    Returns ``(code, token, layer, slot)``: code 0 = all valid, 1 = id out of range at that slot,
    2 = id at that slot repeats an earlier slot of the same token and layer.
    """
    n_tok, n_lay, k = experts.shape
    for t in range(n_tok):
        for layer in range(n_lay):
            for s in range(k):
                e = experts[t, layer, s]
                if e < 0 or e >= n_experts:
                    return 1, t, layer, s
                for r in range(s):
                    if experts[t, layer, r] == e:
                        return 2, t, layer, s
    return 0, -1, -1, -1


def _native(arr: np.ndarray) -> np.ndarray:
    """`arr` in the machine's byte order (values kept): numba kernels cannot type a big-endian array."""
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def _as_int_array(x: Any, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise TraceError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    arr = _native(arr)
    if arr.size and arr.dtype.kind not in "iu":  # not np.integer: timedelta64 is one
        if (
            arr.dtype.kind == "f"
            and np.all(np.isfinite(arr))
            and np.all(arr == np.round(arr))
            and np.abs(arr).max() < 2.0**63  # would wrap in int64
        ):
            arr = arr.astype(np.int64)
        else:
            raise TraceError(f"{name} must hold integers, got dtype {arr.dtype}; convert the source ids to int")
    return arr


def validate_experts(experts: np.ndarray, n_experts: int, token_offset: int = 0) -> None:
    """Raise `TraceError` naming the first token/layer/slot whose id is out of range or repeated.

    Parameters
    ----------
    experts : [tokens, layers, k] integer array.
    n_experts : number of routed experts per layer; valid ids are ``0 .. n_experts-1``.
    token_offset : added to token indices in messages (when validating a chunk of a larger trace).
    """
    if experts.dtype.kind not in "iuf":  # what the kernel can compare with n_experts
        raise TraceError(f"experts must hold integers, got dtype {experts.dtype}; convert the source ids to int")
    for lo in range(0, experts.shape[0], _VALIDATE_BLOCK):
        block = _native(experts[lo : lo + _VALIDATE_BLOCK])
        code, t, layer, s = _first_bad_selection(block, n_experts)
        if code == 0:
            continue
        tok = token_offset + lo + int(t)
        value = int(block[t, layer, s])
        row = [int(v) for v in block[t, layer]]
        if code == 1:
            raise TraceError(
                f"token {tok}, layer index {layer}, slot {s} has expert id {value} but the trace declares "
                f"{n_experts} experts (valid ids 0..{n_experts - 1}); pass the model's real --n-experts, or "
                f"check that ids are logical (not physical/replica) ids"
            )
        raise TraceError(
            f"token {tok}, layer index {layer} selects expert {value} twice (row {row}); each token's k "
            f"experts must be distinct: check the source's column order or the --top-k used to parse it"
        )


@dataclasses.dataclass(frozen=True)
class Extra:
    """An optional per-token array of a trace (the registry `EXTRAS`).

    name : its key in ``RoutingTrace.extras`` (and its array's name in stores and .npz files).
    dtype : how it is stored. ndim : dimensions, the token axis first. layered : axis 1 is the trace's
    layer axis (slices and `select_layers` cut it). ids : it holds expert ids (checked against the expert
    count; -1 allowed where `missing` says so). shape : the docstring's shape. per_k : its last axis has the
    trace's top-k entries.
    """

    name: str
    dtype: np.dtype
    ndim: int
    layered: bool
    ids: bool
    missing: bool
    shape: str
    per_k: bool = False

    def check(self, value: Any, n_tokens: int, n_layers: int, n_experts: int, top_k: int) -> np.ndarray:
        """`value` as this extra's array, checked against the trace's shape; `TraceError` naming the problem."""
        a = np.asarray(value)
        if (
            a.ndim != self.ndim
            or a.shape[0] != n_tokens
            or (self.layered and a.shape[1] != n_layers)
            or (self.per_k and a.shape[-1] != top_k)
        ):
            raise TraceError(
                f"{self.name} has shape {a.shape}, expected {self.shape} with {n_tokens} tokens"
                + (f" and {n_layers} layers" if self.layered else "")
                + (f" and k = {top_k}" if self.per_k else "")
                + f"; give one row per token, or no {self.name}"
            )
        if np.issubdtype(self.dtype, np.integer):
            a = _as_int_array(a, f"{self.name} {self.shape}", self.ndim)
            lo = -1 if self.missing else 0
            hi = n_experts - 1 if self.ids else int(np.iinfo(self.dtype).max)
            if a.size and (a.min() < lo or a.max() > hi):
                bad = int(a.min()) if a.min() < lo else int(a.max())
                raise TraceError(f"{self.name} holds {bad}; expected values in {lo}..{hi}")
        else:
            if not np.issubdtype(a.dtype, np.number):
                raise TraceError(f"{self.name} must hold numbers, got dtype {a.dtype}")
            if a.size and not (np.all(np.isfinite(a)) and a.min() >= 0):
                raise TraceError(f"{self.name} holds a value that is not a finite number >= 0")
        return np.ascontiguousarray(a, dtype=self.dtype)


EXTRAS: dict[str, Extra] = {
    e.name: e
    for e in (
        Extra("token_ids", TOKEN_DTYPE, 1, False, False, False, "[tokens]"),
        Extra("lookahead", EXPERT_DTYPE, 4, True, True, True, "[tokens, layers, distance, k]", per_k=True),
        Extra("candidates", EXPERT_DTYPE, 3, True, True, False, "[tokens, layers, M]"),
        Extra("candidate_probs", np.dtype(np.float32), 3, True, False, False, "[tokens, layers, M]"),
    )
}


def check_extras(
    extras: Mapping[str, Any], n_tokens: int, n_layers: int, n_experts: int, top_k: int
) -> dict[str, np.ndarray]:
    """Checked extras (`EXTRAS` names only; None values dropped); `TraceError` naming an unknown one."""
    unknown = sorted(set(extras) - set(EXTRAS))
    if unknown:
        raise TraceError(f"unknown extra array(s) {unknown}; a trace can carry {', '.join(EXTRAS)}")
    return {
        name: EXTRAS[name].check(value, n_tokens, n_layers, n_experts, top_k)
        for name, value in extras.items()
        if value is not None
    }


def extras_at_layers(extras: Mapping[str, np.ndarray], positions: np.ndarray) -> dict[str, np.ndarray]:
    """`extras` with their layer axes cut to ``positions`` (indices along the layer axis, in the new order).

    ``lookahead`` is re-indexed, not just cut: its entry ``[:, i, d - 1]`` names the experts of the layer
    ``d`` positions after ``i``, so after the cut it holds, for each kept layer and distance d, the old
    prediction for the layer now d positions later where that layer was at most the captured depth after
    it in the original order, else -1 (e.g. layers 0, 2, 3 of a depth-2 capture: 0 -> 2 is old distance 2;
    0 -> 3 was not captured).
    """
    li = np.asarray(positions, dtype=np.int64)
    out = {}
    for name, a in extras.items():
        if not EXTRAS[name].layered:
            out[name] = a
        elif name == "lookahead":
            depth = a.shape[2]
            la = np.full((a.shape[0], li.size, depth, a.shape[3]), -1, dtype=a.dtype)
            for i in range(li.size):
                for d in range(1, min(depth, li.size - 1 - i) + 1):
                    gap = int(li[i + d] - li[i])
                    if 1 <= gap <= depth:
                        la[:, i, d - 1] = a[:, li[i], gap - 1]
            out[name] = la
        else:
            out[name] = a[:, li]
    return out


def layer_positions(layer_ids: np.ndarray, layers: Sequence[int]) -> np.ndarray:
    """[m] int64 positions along a trace's layer axis (its model ``layer_ids``) of the model layer ids
    `layers`, in the given order.

    Raises
    ------
    UsageError : a layer id that is not in `layer_ids`, an empty selection, or a repeat.
    """
    from moescope.errors import UsageError

    pos = {int(lid): i for i, lid in enumerate(np.asarray(layer_ids).tolist())}
    missing = [int(x) for x in layers if int(x) not in pos]
    if missing:
        raise UsageError(
            f"layer(s) {missing} are not in this trace; its MoE layers are {np.asarray(layer_ids).tolist()}"
        )
    if not len(layers) or len(set(int(x) for x in layers)) != len(layers):
        raise UsageError(f"layer selection {list(layers)} must be non-empty without repeats")
    return np.asarray([pos[int(x)] for x in layers], dtype=np.int64)


def _check_seq_starts(seq_starts: Any, n_tokens: int) -> np.ndarray:
    if seq_starts is None:
        return np.zeros(1 if n_tokens else 0, dtype=np.int64)
    s = _as_int_array(seq_starts, "seq_starts", 1).astype(np.int64, copy=False)
    if n_tokens == 0:
        if s.size:
            raise TraceError(f"seq_starts has {s.size} entries but the trace has no tokens; pass seq_starts=[]")
        return s
    if s.size == 0:
        raise TraceError("seq_starts is empty but the trace has tokens; pass seq_starts=[0] for one sequence")
    if s[0] != 0:
        raise TraceError(f"seq_starts[0] is {int(s[0])}, expected 0 (the first sequence starts at token 0)")
    bad = np.flatnonzero(np.diff(s) <= 0)
    if bad.size:
        i = int(bad[0]) + 1
        raise TraceError(
            f"seq_starts is not strictly increasing: seq_starts[{i - 1}]={int(s[i - 1])}, "
            f"seq_starts[{i}]={int(s[i])}; sort the sequences and drop empty ones"
        )
    if s[-1] >= n_tokens:
        raise TraceError(
            f"seq_starts[{s.size - 1}]={int(s[-1])} is not below the token count {n_tokens}; "
            f"a sequence must hold at least one token"
        )
    return s


def _check_layer_ids(layer_ids: Any, n_layers: int) -> np.ndarray:
    if layer_ids is None:
        return np.arange(n_layers, dtype=np.int64)
    ids = _as_int_array(list(layer_ids) if not isinstance(layer_ids, np.ndarray) else layer_ids, "layer_ids", 1)
    ids = ids.astype(np.int64, copy=False)
    if ids.size != n_layers:
        raise TraceError(
            f"layer_ids has {ids.size} entries but the data has {n_layers} MoE layers; "
            f"give one model layer index per MoE layer"
        )
    if ids.size and ids.min() < 0:
        raise TraceError(f"layer_ids contains {int(ids.min())}; model layer indices are >= 0")
    if np.unique(ids).size != ids.size:
        vals, cnt = np.unique(ids, return_counts=True)
        raise TraceError(f"layer_ids repeats layer {int(vals[cnt > 1][0])}; each MoE layer must appear once")
    return ids


def _check_n_experts(n_experts: Any, k: int | None) -> int:
    if isinstance(n_experts, bool) or not isinstance(n_experts, (int, np.integer)):
        raise TraceError(f"n_experts must be an integer, got {n_experts!r}")
    n = int(n_experts)
    if not 1 <= n <= MAX_EXPERTS:
        raise TraceError(f"n_experts is {n}, expected 1..{MAX_EXPERTS}")
    if k is not None and k > n:
        raise TraceError(f"top_k is {k} but n_experts is only {n}; a token cannot pick more experts than exist")
    return n


class RoutingTrace:
    """Per-token routing decisions of one model over one workload (see the module docstring for shapes).

    Parameters
    ----------
    experts : [tokens, layers, k] integer array of expert ids (stored as int16).
    n_experts : routed experts per MoE layer.
    weights : [tokens, layers, k] gate weights, float16 or float32 (other floats are cast to float32).
    seq_starts : [sequences] token index where each sequence begins; default one sequence.
    seq_labels : [sequences] label per sequence (workload, task...), or None.
    extras : optional per-token arrays by name (`EXTRAS`: token_ids, lookahead, candidates, candidate_probs).
    token_ids : shorthand for ``extras["token_ids"]``.
    layer_ids : [layers] model layer index of each MoE layer; default ``0..layers-1``.
    phase : ``"prefill"`` (teacher-forced / prompt processing) or ``"decode"`` (generated tokens).
    meta : provenance (`TraceMeta` or a dict with model/source/corpus/created/...).
    validate : check ids (range, distinctness); pass False only for data this package just validated.
    """

    __slots__ = (
        "experts",
        "extras",
        "layer_ids",
        "meta",
        "n_experts",
        "phase",
        "seq_labels",
        "seq_starts",
        "weights",
    )

    def __init__(
        self,
        experts: Any,
        n_experts: int,
        *,
        weights: Any = None,
        seq_starts: Any = None,
        seq_labels: Sequence[str] | np.ndarray | None = None,
        layer_ids: Any = None,
        phase: str = "prefill",
        meta: TraceMeta | Mapping[str, Any] | None = None,
        extras: Mapping[str, Any] | None = None,
        token_ids: Any = None,
        validate: bool = True,
    ) -> None:
        ex = _as_int_array(experts, "experts [tokens, layers, k]", 3)
        n_tok, n_lay, k = ex.shape
        if k == 0 or n_lay == 0:
            raise TraceError(f"experts has shape {ex.shape}; need at least one MoE layer and k >= 1")
        self.n_experts = _check_n_experts(n_experts, k)
        if validate and ex.size:
            validate_experts(ex, self.n_experts)
        self.experts = np.ascontiguousarray(ex, dtype=EXPERT_DTYPE)

        if weights is not None:
            w = np.asarray(weights)
            if w.shape != ex.shape:
                raise TraceError(
                    f"weights has shape {w.shape} but experts has shape {ex.shape}; "
                    f"give one gate weight per selected expert, or no weights"
                )
            if w.dtype not in WEIGHT_DTYPES:
                if not np.issubdtype(w.dtype, np.number):
                    raise TraceError(f"weights must be floats, got dtype {w.dtype}")
                w = w.astype(np.float32)
            if validate and w.size:
                _check_weights(w)
            weights = np.ascontiguousarray(w)
        self.weights = weights
        self.seq_starts = _check_seq_starts(seq_starts, n_tok)
        if seq_labels is not None:
            labels = np.asarray(seq_labels, dtype=str)
            if labels.shape != self.seq_starts.shape:
                raise TraceError(
                    f"seq_labels has {labels.size} entries but there are {self.seq_starts.size} sequences; "
                    f"give one label per sequence"
                )
            seq_labels = labels
        self.seq_labels = seq_labels
        given = dict(extras or {})
        if token_ids is not None:
            given["token_ids"] = token_ids
        self.extras = check_extras(given, n_tok, n_lay, self.n_experts, k)
        self.layer_ids = _check_layer_ids(layer_ids, n_lay)
        if phase not in PHASES:
            raise TraceError(f"phase is {phase!r}, expected one of {', '.join(PHASES)}")
        self.phase = phase
        self.meta = meta if isinstance(meta, TraceMeta) else TraceMeta.from_dict(meta)

    @property
    def token_ids(self) -> np.ndarray | None:
        """[tokens] int32 vocabulary ids (``extras["token_ids"]``), or None when unknown."""
        return self.extras.get("token_ids")

    # -- shape -----------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def n_sequences(self) -> int:
        return int(self.seq_starts.size)

    @property
    def seq_ends(self) -> np.ndarray:
        """[sequences] int64, one past the last token of each sequence."""
        return np.append(self.seq_starts[1:], self.n_tokens).astype(np.int64)

    @property
    def seq_lengths(self) -> np.ndarray:
        """[sequences] int64 tokens per sequence."""
        return self.seq_ends - self.seq_starts

    def token_sequence(self) -> np.ndarray:
        """[tokens] int64: index of the sequence each token belongs to."""
        return np.repeat(np.arange(self.n_sequences, dtype=np.int64), self.seq_lengths)

    def labels(self) -> list[str]:
        """Distinct sequence labels in first-seen order (empty when unlabelled)."""
        if self.seq_labels is None:
            return []
        return list(dict.fromkeys(self.seq_labels.tolist()))

    # -- derived ----------------------------------------------------------------------------------
    def counts(self, mass: Literal["counts", "gate"] = "counts") -> ExpertCounts:
        """Per-layer, per-expert totals: selections (``"counts"``) or summed gate weight (``"gate"``)."""
        return ExpertCounts.from_trace(self, mass=mass)

    def iter_sequences(self) -> Iterator[tuple[int, slice]]:
        """Yield ``(sequence index, token slice)`` in order."""
        for i, (a, b) in enumerate(zip(self.seq_starts.tolist(), self.seq_ends.tolist(), strict=True)):
            yield i, slice(a, b)

    def replace(self, **changes: Any) -> RoutingTrace:
        """A new trace with some fields replaced (validated again unless ``validate=False``)."""
        fields = {
            "experts": self.experts,
            "n_experts": self.n_experts,
            "weights": self.weights,
            "seq_starts": self.seq_starts,
            "seq_labels": self.seq_labels,
            "layer_ids": self.layer_ids,
            "phase": self.phase,
            "meta": self.meta,
            "extras": self.extras,
        }
        validate = changes.pop("validate", True)
        if "token_ids" in changes:  # shorthand for one extra
            fields["extras"] = {**fields["extras"], "token_ids": changes.pop("token_ids")}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"unknown trace field(s): {sorted(unknown)}")
        fields.update(changes)
        experts = fields.pop("experts")
        return RoutingTrace(experts, validate=validate, **fields)

    def equals(self, other: RoutingTrace, *, check_meta: bool = True) -> bool:
        """Exact equality of every array and field (meta compared without `created` unless asked)."""
        if not isinstance(other, RoutingTrace):
            return False
        same = (
            self.n_experts == other.n_experts
            and self.phase == other.phase
            and np.array_equal(self.experts, other.experts)
            and np.array_equal(self.seq_starts, other.seq_starts)
            and np.array_equal(self.layer_ids, other.layer_ids)
            and _opt_equal(self.weights, other.weights)
            and _opt_equal(self.seq_labels, other.seq_labels)
            and self.extras.keys() == other.extras.keys()
            and all(_opt_equal(v, other.extras[k]) for k, v in self.extras.items())
        )
        if same and self.weights is not None:
            same = self.weights.dtype == other.weights.dtype
        return same and (not check_meta or self.meta == other.meta)

    def summary(self) -> dict[str, Any]:
        """Shape and provenance as a JSON-able dict."""
        return {
            "tokens": self.n_tokens,
            "layers": self.n_layers,
            "top_k": self.top_k,
            "n_experts": self.n_experts,
            "sequences": self.n_sequences,
            "layer_ids": self.layer_ids.tolist(),
            "phase": self.phase,
            "has_weights": self.weights is not None,
            "weights_dtype": None if self.weights is None else str(self.weights.dtype),
            "has_token_ids": self.token_ids is not None,
            "extras": {name: list(a.shape[1:]) for name, a in self.extras.items()},
            "labels": self.labels(),
            "meta": self.meta.to_dict(),
        }

    def __repr__(self) -> str:
        return (
            f"RoutingTrace(tokens={self.n_tokens}, layers={self.n_layers}, k={self.top_k}, "
            f"n_experts={self.n_experts}, sequences={self.n_sequences}, phase={self.phase!r}, "
            f"weights={'yes' if self.weights is not None else 'no'}, model={self.meta.model!r})"
        )


def _opt_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _check_weights(w: np.ndarray) -> None:
    for lo in range(0, w.shape[0], _VALIDATE_BLOCK):
        block = w[lo : lo + _VALIDATE_BLOCK]
        bad = ~np.isfinite(block) | (block < 0)
        if bad.any():
            t, layer, s = (int(v) for v in np.argwhere(bad)[0])
            raise TraceError(
                f"token {lo + t}, layer index {layer}, slot {s} has gate weight {float(block[t, layer, s])!r}; "
                f"gate weights must be finite and >= 0 (record post-softmax/sigmoid weights, not logits)"
            )


# ----------------------------------------------------------------------------------------------


class ExpertCounts:
    """Per-layer, per-expert routing mass: how many selections (or how much gate weight) each expert got.

    Parameters
    ----------
    values : [layers, experts] counts (int64) or mass (float64); shares when ``normalized``.
    n_experts : experts per layer (must equal ``values.shape[1]``); default from the shape.
    top_k : experts per token, when known.
    tokens : tokens behind the counts, when known (then each counts row sums to ``tokens * top_k``).
    layer_ids : [layers] model layer index of each row; default ``0..layers-1``.
    normalized : rows are shares summing to 1 (tolerance 1e-3 for rounded sources).
    mass : ``"counts"`` (selections) or ``"gate"`` (summed gate weights).
    meta : provenance.
    """

    __slots__ = ("layer_ids", "mass", "meta", "n_experts", "normalized", "tokens", "top_k", "values")
    ROW_SUM_TOLERANCE = 1e-3

    def __init__(
        self,
        values: Any,
        n_experts: int | None = None,
        *,
        top_k: int | None = None,
        tokens: int | None = None,
        layer_ids: Any = None,
        normalized: bool = False,
        mass: str = "counts",
        meta: TraceMeta | Mapping[str, Any] | None = None,
    ) -> None:
        try:
            v = np.asarray(values)
        except ValueError as exc:  # ragged nested lists
            raise TraceError(f"counts must be a [layers, experts] table with equal-length rows ({exc})") from None
        if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
            raise TraceError(
                f"counts must be a non-empty [layers, experts] table, got shape {v.shape}; "
                f"give one row per MoE layer with one value per expert"
            )
        if not np.issubdtype(v.dtype, np.number) or np.issubdtype(v.dtype, np.complexfloating):
            raise TraceError(f"counts must be numbers, got dtype {v.dtype}")
        if np.issubdtype(v.dtype, np.floating):
            bad = np.argwhere(~np.isfinite(v))
            if bad.size:
                layer, e = (int(i) for i in bad[0])
                raise TraceError(
                    f"counts at layer index {layer}, expert {e} is {v[layer, e].item()!r}; expected a finite number"
                )
        neg = np.argwhere(v < 0)
        if neg.size:
            layer, e = (int(i) for i in neg[0])
            raise TraceError(
                f"counts at layer index {layer}, expert {e} is {v[layer, e].item()!r}; counts and shares cannot be "
                f"negative: check the column order (layer, expert, count) of the source"
            )
        if np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.bool_):
            v = v.astype(np.int64)
        else:
            v = v.astype(np.float64)
        self.n_experts = _check_n_experts(v.shape[1] if n_experts is None else n_experts, top_k)
        if v.shape[1] != self.n_experts:
            raise TraceError(
                f"counts rows have {v.shape[1]} experts but n_experts is {self.n_experts}; give one value per expert"
            )
        if mass not in MASS_KINDS:
            raise TraceError(f"mass is {mass!r}, expected one of {', '.join(MASS_KINDS)}")
        if normalized:
            sums = v.sum(axis=1)
            off = np.flatnonzero(np.abs(sums - 1.0) > self.ROW_SUM_TOLERANCE)
            if off.size:
                i = int(off[0])
                raise TraceError(
                    f"counts are marked normalized but layer index {i} sums to {sums[i]:.6g}, not 1; "
                    f"drop 'normalized' (raw counts) or remove empty layers"
                )
        if top_k is not None and (isinstance(top_k, bool) or not 1 <= int(top_k) <= self.n_experts):
            raise TraceError(f"top_k is {top_k!r}, expected an integer in 1..{self.n_experts}")
        if tokens is not None:
            tokens = int(tokens)
            if tokens < 0:
                raise TraceError(f"tokens is {tokens}; expected a count >= 0")
            if mass == "counts" and not normalized and top_k is not None and np.issubdtype(v.dtype, np.integer):
                sums = v.sum(axis=1)
                off = np.flatnonzero(sums != tokens * int(top_k))
                if off.size:
                    i = int(off[0])
                    raise TraceError(
                        f"layer index {i} counts sum to {int(sums[i])} but tokens x top_k = {tokens} x {top_k} = "
                        f"{tokens * int(top_k)}; fix 'tokens' / 'top_k' or omit 'tokens'"
                    )
        self.values = v
        self.top_k = None if top_k is None else int(top_k)
        self.tokens = tokens
        self.layer_ids = _check_layer_ids(layer_ids, v.shape[0])
        self.normalized = bool(normalized)
        self.mass = mass
        self.meta = meta if isinstance(meta, TraceMeta) else TraceMeta.from_dict(meta)

    @property
    def n_layers(self) -> int:
        return int(self.values.shape[0])

    @classmethod
    def from_trace(cls, trace: RoutingTrace, mass: Literal["counts", "gate"] = "counts") -> ExpertCounts:
        """Count selections (or sum gate weights) per layer and expert over all tokens of `trace`."""
        if mass not in MASS_KINDS:
            raise TraceError(f"mass is {mass!r}, expected one of {', '.join(MASS_KINDS)}")
        if mass == "gate" and trace.weights is None:
            raise TraceError("mass 'gate' needs gate weights but this trace has none; use mass 'counts'")
        values = expert_mass(trace.experts, trace.n_experts, trace.weights if mass == "gate" else None)
        return cls(
            values,
            trace.n_experts,
            top_k=trace.top_k,
            tokens=trace.n_tokens,
            layer_ids=trace.layer_ids,
            mass=mass,
            meta=trace.meta,
        )

    def shares(self) -> np.ndarray:
        """[layers, experts] float64, each row summing to 1 (a row of zeros stays zeros)."""
        v = self.values.astype(np.float64)
        s = v.sum(axis=1, keepdims=True)
        return np.divide(v, s, out=np.zeros_like(v), where=s > 0)

    def normalize(self) -> ExpertCounts:
        """These counts as shares (rows sum to 1)."""
        return ExpertCounts(
            self.shares(),
            self.n_experts,
            top_k=self.top_k,
            tokens=self.tokens,
            layer_ids=self.layer_ids,
            normalized=True,
            mass=self.mass,
            meta=self.meta,
        )

    def equals(self, other: ExpertCounts, *, check_meta: bool = True) -> bool:
        return (
            isinstance(other, ExpertCounts)
            and self.values.dtype == other.values.dtype
            and np.array_equal(self.values, other.values)
            and self.n_experts == other.n_experts
            and self.top_k == other.top_k
            and self.tokens == other.tokens
            and np.array_equal(self.layer_ids, other.layer_ids)
            and self.normalized == other.normalized
            and self.mass == other.mass
            and (not check_meta or self.meta == other.meta)
        )

    def summary(self) -> dict[str, Any]:
        return {
            "layers": self.n_layers,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "tokens": self.tokens,
            "normalized": self.normalized,
            "mass": self.mass,
            "layer_ids": self.layer_ids.tolist(),
            "meta": self.meta.to_dict(),
        }

    def __repr__(self) -> str:
        return (
            f"ExpertCounts(layers={self.n_layers}, n_experts={self.n_experts}, top_k={self.top_k}, "
            f"tokens={self.tokens}, normalized={self.normalized}, mass={self.mass!r}, model={self.meta.model!r})"
        )


def expert_mass(experts: np.ndarray, n_experts: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Selections (or summed gate weight) per layer and expert.

    Parameters
    ----------
    experts : [tokens, layers, k] int expert ids (already validated).
    n_experts : experts per layer.
    weights : [tokens, layers, k] gate weights; when given, sum weights instead of counting.

    Returns
    -------
    [layers, experts] int64 counts, or float64 gate mass when `weights` is given.
    """
    n_tok, n_lay, _ = experts.shape
    out = np.zeros((n_lay, n_experts), dtype=np.float64 if weights is not None else np.int64)
    offsets = (np.arange(n_lay, dtype=np.int64) * n_experts)[None, :, None]
    for lo in range(0, n_tok, _VALIDATE_BLOCK):
        idx = (experts[lo : lo + _VALIDATE_BLOCK].astype(np.int64) + offsets).ravel()
        if weights is None:
            out += np.bincount(idx, minlength=n_lay * n_experts).reshape(n_lay, n_experts)
        else:
            w = weights[lo : lo + _VALIDATE_BLOCK].astype(np.float64).ravel()
            out += np.bincount(idx, weights=w, minlength=n_lay * n_experts).reshape(n_lay, n_experts)
    return out
