"""Routing agreement between two traces of the same tokens: two engines, quantizations, top-k or versions.

`compare_traces(a, b)` checks that the traces are aligned (same token count and sequences, the same token
ids where both recorded them, the same experts per layer) and then, per MoE layer present in both:

- ``identical``: the share of tokens whose expert *sets* are equal (order ignored; needs the same k);
- ``overlap``: the mean of ``|A ∩ B| / min(k_A, k_B)`` (1 when the smaller set is inside the larger one, so
  it also reads a top-k reduction: is the top-4 set inside the top-8 set?);
- ``top1``: the share of tokens whose highest-weight expert is the same (slot 0 where a trace has no
  weights);
- ``weight_error``: mean and max ``|w_A(e) - w_B(e)|`` over the experts of tokens whose sets agree (both
  traces with weights);
- ``first_divergence``: the first token whose sets differ;
- ``margin``: for each disagreement, how close the contested experts were. Gate weights are the router's
  scores divided by a per-token normaliser (softmax over the top-k, sigmoid scores over their sum, times a
  constant), so the ratio of two weights of one token is the ratio of their scores, normaliser and scaling
  cancelled. With a shared expert ``c`` of both sets as the reference, ``ln(w_A(a) / w_A(c))`` and
  ``ln(w_B(b) / w_B(c))`` put the experts only A chose and only B chose on one log-score scale; the margin
  is the largest gap between them, paired in order. A small margin is a near-tie (numerics decided it), a
  large one a real difference in routing (another rule, a changed model). Unknown (NaN) without weights,
  with different k, or when the two sets share no expert. For routers whose score adds a bias before
  selection (DeepSeek-V3's correction bias) the weights carry the unbiased score, so the margin is the
  gate's, not the selection's. ``near_tie`` is the share of disagreements with a margin below the given
  log-ratio (0.01: scores within 1%, a definition, not a fitted value).

Pure functions over arrays, no I/O. Tokens are compared in blocks, so memory stays bounded.

    >>> result = compare_traces(load_trace("hf.zarr"), load_trace("llama.zarr"))
    >>> result.layers[0].identical
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from moescope.errors import UsageError
from moescope.trace import RoutingTrace

DEFAULT_NEAR_TIE = 0.01  # |ln score ratio| below which a disagreement is a near-tie (scores within 1%)
DEFAULT_POSITIONS = 10  # divergent positions listed
_BLOCK = 1 << 16  # tokens per block


@dataclasses.dataclass(frozen=True)
class LayerAgreement:
    """Agreement at one MoE layer (see the module docstring for each figure); shares are in 0..1."""

    layer_id: int
    identical: float | None
    overlap: float
    top1: float
    weight_error: float | None
    weight_error_max: float | None
    disagreements: int
    first_divergence: int | None
    near_tie: float | None
    median_margin: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Divergence:
    """One token and layer where the two traces chose different experts."""

    token: int
    sequence: int
    position: int
    layer_id: int
    a: tuple[int, ...]
    b: tuple[int, ...]
    margin: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """`compare_traces`' result: per layer, overall (every token x layer pooled), the first divergences."""

    tokens: int
    top_k: tuple[int, int]
    layers: tuple[LayerAgreement, ...]
    overall: LayerAgreement
    divergences: tuple[Divergence, ...]
    aligned_by: str
    near_tie_threshold: float
    labels: tuple[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "tokens": self.tokens,
            "top_k": list(self.top_k),
            "aligned_by": self.aligned_by,
            "near_tie_threshold": self.near_tie_threshold,
            "overall": {k: v for k, v in self.overall.to_dict().items() if k != "layer_id"},
            "layers": [x.to_dict() for x in self.layers],
            "divergences": [d.to_dict() for d in self.divergences],
        }


def check_aligned(a: RoutingTrace, b: RoutingTrace, labels: tuple[str, str] = ("A", "B")) -> str:
    """Refuse traces that are not of the same tokens; return how alignment was checked.

    Raises
    ------
    UsageError : different token counts, sequences, expert counts, token ids, or no MoE layer in common.
    """
    if a.n_tokens != b.n_tokens:
        raise UsageError(
            f"the traces hold {a.n_tokens} and {b.n_tokens} tokens; compare needs two captures of the same tokens "
            f"(capture both with the same corpus, --seq-len and --max-tokens, or slice one with moescope trace slice)"
        )
    if not np.array_equal(a.seq_starts, b.seq_starts):
        n = min(a.n_sequences, b.n_sequences)
        diff = np.flatnonzero(a.seq_starts[:n] != b.seq_starts[:n])
        where = (
            f"sequence {int(diff[0])} starts at token {int(a.seq_starts[diff[0]])} in A and "
            f"{int(b.seq_starts[diff[0]])} in B"
            if diff.size
            else f"A has {a.n_sequences} sequences and B {b.n_sequences}"
        )
        raise UsageError(f"the traces cut their tokens into different sequences ({where}); capture both alike")
    if a.n_experts != b.n_experts:
        raise UsageError(f"the traces have {a.n_experts} and {b.n_experts} experts per layer: not the same model")
    if not np.intersect1d(a.layer_ids, b.layer_ids).size:
        raise UsageError(
            f"the traces share no MoE layer (A: {a.layer_ids.tolist()}, B: {b.layer_ids.tolist()}); "
            f"compare captures of the same model"
        )
    if a.token_ids is None or b.token_ids is None:
        missing = " and ".join(n for n, t in zip(labels, (a, b), strict=True) if t.token_ids is None)
        return f"token count and sequences ({missing} recorded no token ids)"
    diff = np.flatnonzero(a.token_ids != b.token_ids)
    if diff.size:
        t = int(diff[0])
        seq = int(np.searchsorted(a.seq_starts, t, side="right")) - 1
        raise UsageError(
            f"token {t} (sequence {seq}, position {t - int(a.seq_starts[seq])}) is id {int(a.token_ids[t])} in A "
            f"and {int(b.token_ids[t])} in B ({diff.size} tokens differ): the traces are not of the same token ids; "
            f"feed both engines the same ids (e.g. capture llama --tokens-from A)"
        )
    return "token ids"


def _top1(experts: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """[n] the highest-weight expert of each row of ``experts [n, k]`` (slot 0 without weights)."""
    if weights is None:
        return experts[:, 0]
    return np.take_along_axis(experts, np.argmax(weights, axis=1)[:, None], axis=1)[:, 0]


def _by_id(experts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weights of each row sorted by expert id (to align the weights of equal sets)."""
    return np.take_along_axis(weights, np.argsort(experts, axis=1, kind="stable"), axis=1)


def margins(ea: np.ndarray, wa: np.ndarray, eb: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """[n] the log-score margin of each disagreeing row (see the module docstring; NaN without a shared expert).

    Parameters
    ----------
    ea, eb : [n, k] expert ids of rows whose sets differ; wa, wb : [n, k] their gate weights.
    """
    eq = ea[:, :, None] == eb[:, None, :]  # [n, k, k]
    shared_a, shared_b = eq.any(axis=2), eq.any(axis=1)
    tiny = np.finfo(np.float64).tiny
    la, lb = np.log(np.maximum(wa.astype(np.float64), tiny)), np.log(np.maximum(wb.astype(np.float64), tiny))
    # the reference: the shared expert with the largest weight in A, found at its slot in B too
    ref_a = np.argmax(np.where(shared_a, la, -np.inf), axis=1)
    ref_id = np.take_along_axis(ea, ref_a[:, None], axis=1)
    ref_b = np.argmax(eb == ref_id, axis=1)
    sa = la - np.take_along_axis(la, ref_a[:, None], axis=1)
    sb = lb - np.take_along_axis(lb, ref_b[:, None], axis=1)
    only_a = -np.sort(-np.where(shared_a, -np.inf, sa), axis=1)  # contested experts first, descending
    only_b = -np.sort(-np.where(shared_b, -np.inf, sb), axis=1)
    with np.errstate(invalid="ignore"):  # -inf - -inf past the contested experts, masked out
        gap = np.where(np.isfinite(only_a) & np.isfinite(only_b), np.abs(only_a - only_b), -np.inf)
    out = gap.max(axis=1)
    out[~shared_a.any(axis=1)] = np.nan
    return out


class _Sums:
    """Running sums for one layer (or all layers pooled)."""

    def __init__(self) -> None:
        self.n = self.identical = self.disagree = 0
        self.overlap = self.top1 = self.werr = 0.0
        self.werr_n = 0
        self.werr_max = 0.0
        self.first: int | None = None
        self.margins: list[np.ndarray] = []

    def add(self, other: _Sums) -> None:
        self.n += other.n
        self.identical += other.identical
        self.disagree += other.disagree
        self.overlap += other.overlap
        self.top1 += other.top1
        self.werr += other.werr
        self.werr_n += other.werr_n
        self.werr_max = max(self.werr_max, other.werr_max)
        self.margins.extend(other.margins)

    def result(self, layer_id: int, same_k: bool, weights: bool, near_tie: float) -> LayerAgreement:
        m = np.concatenate(self.margins) if self.margins else np.zeros(0)
        m = m[np.isfinite(m)]
        n = max(self.n, 1)
        return LayerAgreement(
            layer_id=layer_id,
            identical=self.identical / n if same_k else None,
            overlap=self.overlap / n,
            top1=self.top1 / n,
            weight_error=self.werr / self.werr_n if self.werr_n else (0.0 if weights and same_k else None),
            weight_error_max=self.werr_max if weights and same_k else None,
            disagreements=self.disagree,
            first_divergence=self.first,
            near_tie=float(np.mean(m < near_tie)) if m.size else None,
            median_margin=float(np.median(m)) if m.size else None,
        )


def compare_traces(
    a: RoutingTrace,
    b: RoutingTrace,
    *,
    near_tie: float = DEFAULT_NEAR_TIE,
    positions: int = DEFAULT_POSITIONS,
    labels: tuple[str, str] = ("A", "B"),
) -> Comparison:
    """Token-aligned routing agreement of `a` and `b` (see the module docstring).

    Parameters
    ----------
    a, b : two traces of the same tokens (checked by `check_aligned`); layers present in both are compared.
    near_tie : log-ratio below which a disagreement's margin counts as a near-tie.
    positions : how many divergent (token, layer) positions to list, earliest first.
    labels : names of the two traces in the result.
    """
    if not (near_tie > 0 and math.isfinite(near_tie)):
        raise UsageError(f"--near-tie {near_tie!r}: expected a positive log-ratio such as 0.01")
    if positions < 0:
        raise UsageError(f"--positions {positions}: expected >= 0")
    aligned_by = check_aligned(a, b, labels)
    common = [int(x) for x in a.layer_ids if int(x) in set(b.layer_ids.tolist())]
    ia = {int(x): i for i, x in enumerate(a.layer_ids.tolist())}
    ib = {int(x): i for i, x in enumerate(b.layer_ids.tolist())}
    same_k = a.top_k == b.top_k
    weights = a.weights is not None and b.weights is not None
    sums = {lid: _Sums() for lid in common}
    found: list[Divergence] = []
    for lo in range(0, a.n_tokens, _BLOCK):
        hi = min(a.n_tokens, lo + _BLOCK)
        for lid in common:
            ea = a.experts[lo:hi, ia[lid]].astype(np.int64)
            eb = b.experts[lo:hi, ib[lid]].astype(np.int64)
            wa = None if a.weights is None else a.weights[lo:hi, ia[lid]]
            wb = None if b.weights is None else b.weights[lo:hi, ib[lid]]
            s = sums[lid]
            inter = (ea[:, :, None] == eb[:, None, :]).any(axis=2).sum(axis=1)
            s.n += hi - lo
            s.overlap += float((inter / min(a.top_k, b.top_k)).sum())
            s.top1 += int((_top1(ea, wa) == _top1(eb, wb)).sum())
            if same_k:
                equal = inter == a.top_k
                s.identical += int(equal.sum())
                bad = np.flatnonzero(~equal)
                s.disagree += bad.size
                if bad.size and s.first is None:
                    s.first = lo + int(bad[0])
                margin = np.full(bad.size, np.nan)
                if weights:
                    if equal.any():
                        err = np.abs(
                            _by_id(ea[equal], wa[equal]).astype(np.float64)
                            - _by_id(eb[equal], wb[equal]).astype(np.float64)
                        )
                        s.werr += float(err.sum())
                        s.werr_n += err.size
                        s.werr_max = max(s.werr_max, float(err.max()))
                    if bad.size:
                        margin = margins(ea[bad], wa[bad], eb[bad], wb[bad])
                        s.margins.append(margin)
                for j, t in enumerate(bad[:positions].tolist()):
                    found.append(_divergence(a, lo + t, lid, ea[t], eb[t], margin[j]))
            else:
                bad = np.flatnonzero(inter < min(a.top_k, b.top_k))
                s.disagree += bad.size
                if bad.size and s.first is None:
                    s.first = lo + int(bad[0])
                for t in bad[:positions].tolist():
                    found.append(_divergence(a, lo + t, lid, ea[t], eb[t], np.nan))
    total = _Sums()
    for lid in common:
        total.add(sums[lid])
    firsts = [s.first for s in sums.values() if s.first is not None]
    total.first = min(firsts) if firsts else None
    found.sort(key=lambda d: (d.token, common.index(d.layer_id)))
    return Comparison(
        tokens=a.n_tokens,
        top_k=(a.top_k, b.top_k),
        layers=tuple(sums[lid].result(lid, same_k, weights, near_tie) for lid in common),
        overall=total.result(-1, same_k, weights, near_tie),
        divergences=tuple(found[:positions]),
        aligned_by=aligned_by,
        near_tie_threshold=near_tie,
        labels=labels,
    )


def _divergence(trace: RoutingTrace, token: int, layer_id: int, ea: Any, eb: Any, margin: float) -> Divergence:
    seq = int(np.searchsorted(trace.seq_starts, token, side="right")) - 1
    return Divergence(
        token=token,
        sequence=seq,
        position=token - int(trace.seq_starts[seq]),
        layer_id=layer_id,
        a=tuple(int(x) for x in ea),
        b=tuple(int(x) for x in eb),
        margin=None if not np.isfinite(margin) else float(margin),
    )
