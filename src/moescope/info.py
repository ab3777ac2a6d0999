"""What `moescope trace info` reports: shape, provenance and a per-layer load summary.

Per layer: experts used, the hottest expert and its share of selections, the coldest share, the load
coefficient of variation (std / mean of per-expert counts), and for a trace the sequence-length spread.
A store is counted chunk by chunk (bounded memory). This is a description, not an analysis: the
concentration gate and friends live in `moescope.analyze`.

    >>> describe_counts(trace.counts())["layers"][0]
    {'layer': 1, 'experts_used': 64, 'top_expert': 12, 'top_share': 0.061, ...}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moescope.store import TraceStore
from moescope.trace import ExpertCounts, RoutingTrace, expert_mass


def layer_rows(counts: ExpertCounts) -> list[dict[str, Any]]:
    """One dict per layer: layer id, experts used, top expert + share, min share, load CV."""
    shares = counts.shares()
    v = counts.values.astype(np.float64)
    mean = v.mean(axis=1)
    cv = np.divide(v.std(axis=1), mean, out=np.zeros_like(mean), where=mean > 0)
    top = shares.argmax(axis=1)
    rows = []
    for i, lid in enumerate(counts.layer_ids.tolist()):
        rows.append(
            {
                "layer": int(lid),
                "experts_used": int((counts.values[i] > 0).sum()),
                "top_expert": int(top[i]),
                "top_share": float(shares[i, top[i]]),
                "min_share": float(shares[i].min()),
                "load_cv": float(cv[i]),
            }
        )
    return rows


def _length_stats(lengths: np.ndarray) -> dict[str, Any]:
    if lengths.size == 0:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())}


def describe_trace(trace: RoutingTrace) -> dict[str, Any]:
    """Summary + per-layer rows of an in-memory trace."""
    return {
        "kind": "trace",
        **trace.summary(),
        "sequence_lengths": _length_stats(trace.seq_lengths),
        "layers_summary": layer_rows(trace.counts()),
    }


def describe_store(store: TraceStore) -> dict[str, Any]:
    """Summary + per-layer rows of a store, counted chunk by chunk."""
    total = np.zeros((store.n_layers, store.n_experts), dtype=np.int64)
    for chunk in store.iter_chunks():
        total += expert_mass(chunk.trace.experts, store.n_experts)
    counts = ExpertCounts(total, store.n_experts, top_k=store.top_k, tokens=store.n_tokens, layer_ids=store.layer_ids)
    ends = np.append(store.seq_starts[1:], store.n_tokens)
    return {
        "kind": "trace",
        **store.summary(),
        "sequence_lengths": _length_stats(ends - store.seq_starts),
        "layers_summary": layer_rows(counts),
    }


def describe_counts(counts: ExpertCounts) -> dict[str, Any]:
    """Summary + per-layer rows of aggregate counts."""
    return {"kind": "counts", **counts.summary(), "layers_summary": layer_rows(counts)}
