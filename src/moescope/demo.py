"""The main job on the built-in default data (what `make demo` / `moescope demo` runs).

The default input is the project's own fixture (`moescope.fixture`): the routing a tiny Qwen3-MoE model
trained by the project made on held-out text of five domains, captured with ``moescope capture hf``. The
demo writes it as a store, describes it, splits it into train/test halves, reduces it to counts and
runs the concentration gate; later issues add the other analyses, simulations, plans and the report.
Library code: returns, prints nothing.

    >>> result = run_demo(Path("demo-out"))
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from moescope import fixture
from moescope.analyze import Concentration, concentration
from moescope.imports import as_trace, read_input, write_output
from moescope.info import describe_store
from moescope.slicing import split_halves
from moescope.store import TraceStore, save_trace
from moescope.trace import expert_mass


@dataclasses.dataclass(frozen=True)
class DemoResult:
    out_dir: Path
    outputs: dict[str, Path]
    info: dict[str, Any]
    layers: list[dict[str, Any]]  # per layer: top share, experts for 90% of mass, top expert per label
    gate: Concentration  # the concentration gate on the whole trace


def experts_for_mass(shares: np.ndarray, mass: float) -> int:
    """How many experts, hottest first, hold `mass` of a layer's routing (`shares` sums to 1)."""
    return int(np.searchsorted(np.cumsum(np.sort(shares)[::-1]), mass - 1e-12) + 1)


def run_demo(out_dir: Path, source: Path = fixture.TRACE) -> DemoResult:
    """Write the demo outputs for the trace at `source` under `out_dir` (earlier demo outputs replaced)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "trace": out_dir / "trace.zarr",
        "train": out_dir / "train.zarr",
        "test": out_dir / "test.zarr",
        "counts": out_dir / "counts.json",
    }
    trace = as_trace(read_input(source), "the demo")
    save_trace(trace, outputs["trace"], overwrite=True)
    info = describe_store(TraceStore(outputs["trace"]))
    train, test = split_halves(trace)
    save_trace(train, outputs["train"], overwrite=True)
    save_trace(test, outputs["test"], overwrite=True)
    counts = trace.counts()
    write_output(counts, outputs["counts"], overwrite=True)
    shares = counts.shares()
    by_label: dict[str, np.ndarray] = {}
    if trace.seq_labels is not None:
        token_label = trace.seq_labels[trace.token_sequence()]
        for lab in trace.labels():
            by_label[lab] = expert_mass(trace.experts[token_label == lab], trace.n_experts)  # [layers, experts]
    layers = [
        {
            "layer": int(lid),
            "top_share": float(shares[i].max()),
            "experts_for_90pct": experts_for_mass(shares[i], 0.9),
            "top_expert_by_label": {lab: int(m[i].argmax()) for lab, m in by_label.items()},
        }
        for i, lid in enumerate(trace.layer_ids.tolist())
    ]
    return DemoResult(out_dir, outputs, info, layers, concentration(counts))
