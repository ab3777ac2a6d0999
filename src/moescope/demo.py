"""The main job on the built-in default data (what `make demo` / `moescope demo` runs).

Until the project's own fixture model and its captured trace land, the default input is a seeded
synthetic trace with planted structure (`DEMO_SPEC`): it is written as a store, described, split into
train/test halves, and reduced to counts; the measured per-layer load is set beside the planted truth, so
the demo also shows that the pipeline measures what is there. Library code: returns a result, prints nothing.

    >>> result = run_demo(Path("demo-out"))
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from moescope.imports import write_output
from moescope.info import describe_store
from moescope.slicing import split_halves
from moescope.store import TraceStore, save_trace
from moescope.synth import SynthSpec, save_synth

DEMO_SPEC = SynthSpec(
    n_tokens=200_000,
    n_layers=12,
    n_experts=64,
    top_k=8,
    seq_len=512,
    seed=2026,
    zipf=tuple(np.round(np.linspace(0.4, 1.3, 12), 3).tolist()),
    n_teams=6,
    team_size=4,
    team_strength=0.5,
    stickiness=0.25,
    domains=("code", "prose", "math"),
    domain_specificity=0.6,
    n_generalists=2,
    generalist_share=0.08,
    model="moescope-demo-synthetic (64 experts, top-8)",
)


@dataclasses.dataclass(frozen=True)
class DemoResult:
    out_dir: Path
    outputs: dict[str, Path]
    info: dict[str, Any]
    layers: list[dict[str, Any]]  # per layer: measured vs planted top share, experts for 50% of mass


def _experts_for_half(shares: np.ndarray) -> int:
    return int(np.searchsorted(np.cumsum(np.sort(shares)[::-1]), 0.5) + 1)


def run_demo(out_dir: Path, spec: SynthSpec = DEMO_SPEC, progress: Any = None) -> DemoResult:
    """Write the demo trace and its derived files under `out_dir` (replacing earlier demo outputs).

    `progress`, if given, is called as ``progress(tokens_done, tokens_total)`` while the trace is written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "trace": out_dir / "trace.zarr",
        "train": out_dir / "train.zarr",
        "test": out_dir / "test.zarr",
        "counts": out_dir / "counts.json",
    }
    save_synth(spec, outputs["trace"], overwrite=True, progress=progress)
    store = TraceStore(outputs["trace"])
    info = describe_store(store)
    trace = store.to_trace()
    train, test = split_halves(trace)
    save_trace(train, outputs["train"], overwrite=True)
    save_trace(test, outputs["test"], overwrite=True)
    counts = trace.counts()
    write_output(counts, outputs["counts"], overwrite=True)

    expected = np.asarray(trace.meta.extra["synth"]["truth"]["expected_share"])  # [L, D, E]
    n_seq_by_domain = np.asarray([np.sum(trace.seq_lengths[trace.seq_labels == d]) for d in spec.domains])
    planted = np.einsum("lde,d->le", expected, n_seq_by_domain / n_seq_by_domain.sum())
    shares = counts.shares()
    layers = [
        {
            "layer": int(lid),
            "top_share": float(shares[i].max()),
            "planted_top_share": float(planted[i].max()),
            "experts_for_half_mass": _experts_for_half(shares[i]),
            "train_tokens": train.n_tokens,
            "test_tokens": test.n_tokens,
        }
        for i, lid in enumerate(trace.layer_ids.tolist())
    ]
    return DemoResult(out_dir, outputs, info, layers)
