"""Slices of a trace: by sequences, tokens, labels, layers, and the train/test split by halves.

The split follows the published OLMoE routing study: every sequence contributes its first half
(``n // 2`` tokens) to *train* and the rest to *test*, so anything fitted on train is scored on later
tokens of the same requests, never on the tokens it was fitted to. A 1-token sequence has an empty first
half and appears only in *test*. Every slice records what was done in ``meta.extra["slices"]``.

Pure functions: `RoutingTrace` in, `RoutingTrace` out; no I/O.

    >>> train, test = split_halves(trace)
    >>> law = select_labels(trace, ["law"])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

from moescope.errors import UsageError
from moescope.trace import RoutingTrace, extras_at_layers, layer_positions

SPLIT_PARTS = ("train", "test")
# what a fitted policy or placement is scored on: the test halves, or everything in-sample (for comparison)
EVAL_SPLITS = ("test", "all")


def _with_note(trace: RoutingTrace, note: dict[str, Any]) -> dict[str, Any]:
    extra = dict(trace.meta.extra)
    extra["slices"] = [*extra.get("slices", []), note]
    return extra


def take_ranges(
    trace: RoutingTrace, starts: np.ndarray, ends: np.ndarray, seq_index: np.ndarray, note: dict[str, Any]
) -> RoutingTrace:
    """Concatenate token ranges ``[starts[i], ends[i])``, each becoming one sequence of the result.

    Parameters
    ----------
    starts, ends : [m] int64 token bounds (empty ranges are dropped).
    seq_index : [m] int64 source sequence of each range (for its label).
    note : what was done, appended to ``meta.extra["slices"]``.
    """
    starts, ends, seq_index = (np.asarray(a, dtype=np.int64) for a in (starts, ends, seq_index))
    keep = ends > starts
    starts, ends, seq_index = starts[keep], ends[keep], seq_index[keep]
    lengths = ends - starts
    new_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths.size else lengths
    # token index array without a Python loop per range
    total = int(lengths.sum())
    idx = np.ones(total, dtype=np.int64)
    if total:
        idx[0] = starts[0]
        idx[new_starts[1:]] = starts[1:] - ends[:-1] + 1
        idx = np.cumsum(idx)
    meta = trace.meta.replace(extra=_with_note(trace, note))
    return RoutingTrace(
        trace.experts[idx],
        trace.n_experts,
        weights=None if trace.weights is None else trace.weights[idx],
        seq_starts=new_starts,
        seq_labels=None if trace.seq_labels is None else trace.seq_labels[seq_index],
        layer_ids=trace.layer_ids,
        phase=trace.phase,
        meta=meta,
        extras={name: a[idx] for name, a in trace.extras.items()},
        validate=False,
    )


def select_sequences(trace: RoutingTrace, indices: Iterable[int]) -> RoutingTrace:
    """The sequences at `indices` (in the given order; no repeats)."""
    idx = np.asarray(list(indices), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= trace.n_sequences):
        bad = int(idx[(idx < 0) | (idx >= trace.n_sequences)][0])
        raise UsageError(f"sequence {bad} does not exist; this trace has sequences 0..{trace.n_sequences - 1}")
    if np.unique(idx).size != idx.size:
        raise UsageError("a sequence is selected twice; list each sequence once")
    return take_ranges(
        trace, trace.seq_starts[idx], trace.seq_ends[idx], idx, {"op": "sequences", "count": int(idx.size)}
    )


def select_tokens(trace: RoutingTrace, start: int, stop: int | None = None) -> RoutingTrace:
    """Tokens ``start:stop``; sequences cut by the bounds keep their in-range part."""
    stop = trace.n_tokens if stop is None else int(stop)
    if not 0 <= start <= stop <= trace.n_tokens:
        raise UsageError(f"token range {start}:{stop} is outside 0:{trace.n_tokens}; pick bounds inside it")
    s = np.clip(trace.seq_starts, start, stop)
    e = np.clip(trace.seq_ends, start, stop)
    return take_ranges(trace, s, e, np.arange(trace.n_sequences), {"op": "tokens", "start": start, "stop": stop})


def select_labels(trace: RoutingTrace, labels: Sequence[str]) -> RoutingTrace:
    """The sequences whose label is one of `labels`."""
    if trace.seq_labels is None:
        raise UsageError("this trace has no sequence labels; slice by --sequences or --tokens instead")
    known = trace.labels()
    unknown = [lab for lab in labels if lab not in known]
    if unknown:
        raise UsageError(f"label(s) {unknown} not in this trace; its labels are {known}")
    idx = np.flatnonzero(np.isin(trace.seq_labels, list(labels)))
    out = take_ranges(trace, trace.seq_starts[idx], trace.seq_ends[idx], idx, {"op": "labels", "labels": list(labels)})
    return out


def label_protocol(
    trace: RoutingTrace, fit_labels: Sequence[str] | None, score_labels: Sequence[str] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (fit, score) labels of the labels protocol: each side as given, or every label of `trace` the other
    side does not name; `UsageError` for an unlabelled trace, an unknown label, a label on both sides or an
    empty side."""
    known = trace.labels()
    if not known:
        raise UsageError(
            "--fit-labels / --score-labels need a trace with sequence labels (this one has none); "
            "use --split test (halves of every sequence) instead"
        )
    given = [*(fit_labels or ()), *(score_labels or ())]
    unknown = [lab for lab in given if lab not in known]
    if unknown:
        raise UsageError(f"label(s) {unknown} are not in this trace; its labels are {known}")
    fit = tuple(dict.fromkeys(fit_labels or [lab for lab in known if lab not in (score_labels or ())]))
    score = tuple(dict.fromkeys(score_labels or [lab for lab in known if lab not in fit]))
    both = sorted(set(fit) & set(score))
    if both:
        raise UsageError(f"label(s) {both} are both fitted and scored; a label goes to one side only")
    if not fit or not score:
        raise UsageError(
            f"nothing left to {'fit' if not fit else 'score'} on: the trace's labels are {known}; name the "
            f"other side's labels explicitly"
        )
    return fit, score


def select_layers(trace: RoutingTrace, layer_ids: Sequence[int]) -> RoutingTrace:
    """Keep the MoE layers with these model layer ids (in the given order)."""
    li = layer_positions(trace.layer_ids, layer_ids)
    return trace.replace(
        experts=trace.experts[:, li],
        weights=None if trace.weights is None else trace.weights[:, li],
        layer_ids=trace.layer_ids[li],
        meta=trace.meta.replace(extra=_with_note(trace, {"op": "layers", "layer_ids": [int(x) for x in layer_ids]})),
        extras=extras_at_layers(trace.extras, li),
        validate=False,
    )


def split_bounds(trace: RoutingTrace) -> np.ndarray:
    """[sequences] int64 first token of each sequence's second half (``start + length // 2``)."""
    return trace.seq_starts + trace.seq_lengths // 2


def split_ranges(trace: RoutingTrace, part: str) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, stops)``: [sequences] int64 token ranges of the ``"train"`` (first half of every sequence)
    or ``"test"`` (second half) split, without copying the trace (kernels that read ranges use them)."""
    if part not in SPLIT_PARTS:
        raise UsageError(f"split part {part!r} is not one of {', '.join(SPLIT_PARTS)}")
    mid = split_bounds(trace)
    return (trace.seq_starts, mid) if part == "train" else (mid, trace.seq_ends)


def split_part(trace: RoutingTrace, part: Literal["train", "test"]) -> RoutingTrace:
    """The first (``"train"``) or second (``"test"``) half of every sequence."""
    starts, ends = split_ranges(trace, part)
    return take_ranges(trace, starts, ends, np.arange(trace.n_sequences), {"op": "split", "part": part})


def split_halves(trace: RoutingTrace) -> tuple[RoutingTrace, RoutingTrace]:
    """``(train, test)``: first half of every sequence, second half of every sequence."""
    return split_part(trace, "train"), split_part(trace, "test")


MAX_RANGE_ITEMS = 1 << 22  # integers one range list may expand to (4M; a list of sequences or layers is far shorter)
MAX_RANGE_VALUE = (1 << 31) - 1  # ids, counts and budgets all fit int32


def parse_ranges(text: str, what: str = "value", max_items: int = MAX_RANGE_ITEMS) -> list[int]:
    """Parse ``"0,3,5-8"`` (non-negative integers, inclusive ranges) into ``[0, 3, 5, 6, 7, 8]``.

    Values above `MAX_RANGE_VALUE` and lists expanding to more than `max_items` integers are refused before
    anything is built (``2-3000000000`` would be a 3-billion-element list).
    """
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            a, b = 0, -1
        if a < 0 or b < a:
            raise UsageError(
                f"cannot read {what} list {_short(text)!r} at {_short(part)!r}; use non-negative integers and "
                "inclusive ranges like 0,3,5-8"
            )
        if b > MAX_RANGE_VALUE:
            raise UsageError(f"{what} {part!r}: {b:,} is above the largest accepted value {MAX_RANGE_VALUE:,}")
        if len(out) + (b - a + 1) > max_items:
            raise UsageError(
                f"{what} list {_short(text)!r} expands to more than {max_items:,} values; give a shorter range"
            )
        out.extend(range(a, b + 1))
    if not out:
        raise UsageError(f"empty {what} list {_short(text)!r}; give integers like 0,3,5-8")
    return out


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
