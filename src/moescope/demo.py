"""The main job on the built-in default data (what `make demo` / `moescope demo` runs).

The default input is the project's own fixture (`moescope.fixture`): the routing a tiny Qwen3-MoE model
trained by the project made on held-out text of five domains, captured with ``moescope capture hf`` (or
captured afresh with ``capture=True`` when the ``[hf]`` extra is installed). The demo writes it as a store,
describes it, splits it into train/test halves, reduces it to counts and a ranking, and writes the report
(`moescope.report`: concentration gate, co-activation, locality, caches vs Belady, what a cache would buy in
decode tokens/s with the captured lookahead, placement, and the llama.cpp offload plan of the fixture's
GGUF). Library code: returns, prints nothing.

    >>> result = run_demo(Path("demo-out"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moescope import _atomic, fixture
from moescope.analyze import Concentration, concentration, rank_experts, write_ranking_csv
from moescope.imports import as_trace, read_input, write_output
from moescope.info import describe_store
from moescope.report import build_report
from moescope.slicing import split_halves
from moescope.store import TraceStore, save_trace
from moescope.trace import expert_mass

# What the demo prices the fixture's routing at in "what would a cache buy": the fixture's own experts are 48 KiB,
# where the per-transfer latency, not bandwidth, decides everything. At full size the fixture's architecture is
# Qwen3-30B-A3B: an expert is 3 x 2048 x 768 weights, ~2.65 MB at Q4_K_M's ~4.5 bits; the dense weights read per
# token (attention 18.9 M weights per layer, the 151936 x 2048 output head) are ~0.7 GB over 48 MoE layers, ~14.6 MB
# per layer, so 58.4 MB for the fixture's 4 layers. A what-if, stated on the report's card.
WHAT_IF_EXPERT_BYTES = 2.65e6
WHAT_IF_DENSE_BYTES = 4 * 14.6e6
WHAT_IF_SOURCE = "priced as Qwen3-30B-A3B Q4_K_M experts (2.65 MB) and dense weights (14.6 MB per layer)"


@dataclasses.dataclass(frozen=True)
class DemoResult:
    out_dir: Path
    outputs: dict[str, Path]
    info: dict[str, Any]
    layers: list[dict[str, Any]]  # per layer: top share, experts for 90% of mass, top expert per label
    gate: Concentration  # the concentration gate on the whole trace
    summary: dict[str, Any]  # the numbers behind the report


def experts_for_mass(shares: np.ndarray, mass: float) -> int:
    """How many experts, hottest first, hold `mass` of a layer's routing (`shares` sums to 1)."""
    return int(np.searchsorted(np.cumsum(np.sort(shares)[::-1]), mass - 1e-12) + 1)


def run_demo(
    out_dir: Path,
    source: Path = fixture.TRACE,
    *,
    capture: bool = False,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Write the demo outputs for the trace at `source` under `out_dir` (earlier demo outputs replaced).

    With `capture`, the fixture model is first run over its held-out text with the transformers capture
    (needs the ``[hf]`` extra) and that fresh trace is used instead of `source`.
    """
    say = progress or (lambda _msg: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "trace": out_dir / "trace.zarr",
        "train": out_dir / "train.zarr",
        "test": out_dir / "test.zarr",
        "counts": out_dir / "counts.json",
        "ranking": out_dir / "ranking.csv",
        "report": out_dir / "report.html",
    }
    if capture:
        from moescope.capture import capture_hf, read_corpus

        say("capturing")
        source = capture_hf(
            fixture.MODEL_DIR,
            None,
            read_corpus(fixture.HELDOUT_DIR),
            out_dir / "captured.zarr",
            lookahead=2,  # as the committed fixture trace (`moescope.fixture`)
            candidates=4,
            overwrite=True,
        )
        outputs["captured"] = source
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
    write_ranking_csv(rank_experts(trace), outputs["ranking"], overwrite=True)
    report = build_report(
        trace,
        gguf=fixture.GGUF,
        sizes=([WHAT_IF_EXPERT_BYTES] * trace.n_layers, WHAT_IF_DENSE_BYTES, WHAT_IF_SOURCE),
        progress=lambda stage, i, n: say(f"report: {stage} ({i}/{n})"),
    )
    _atomic.write_text_atomic(outputs["report"], report.html, overwrite=True)
    return DemoResult(out_dir, outputs, info, layers, concentration(counts), report.summary)
