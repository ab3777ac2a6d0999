"""`moescope compare A B`: how far two traces of the same tokens route alike (over `moescope.analyze.compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from moescope.analyze.compare import DEFAULT_NEAR_TIE, DEFAULT_POSITIONS
from moescope.cli import _common as c

TraceArg = Annotated[Path, typer.Argument(help="A per-token trace (zarr store, .npz, ESFT logs, engine dumps).")]


def _pct(x: float | None) -> str:
    return "-" if x is None else "100%" if x == 1 else f"{100 * x:.2f}%"


@c.with_inputs
def compare(
    a: TraceArg,
    b: TraceArg,
    layers: Annotated[str | None, typer.Option("--layers", help="Model layer ids to compare, e.g. 1,3,5-8.")] = None,
    near_tie: Annotated[
        float,
        typer.Option(
            "--near-tie",
            help="A disagreement is a near-tie when the contested experts' gate scores are within this log-ratio "
            "(0.01: 1%).",
        ),
    ] = DEFAULT_NEAR_TIE,
    positions: Annotated[int, typer.Option("--positions", min=0, help="Divergent positions to list.")] = (
        DEFAULT_POSITIONS
    ),
    inputs: c.Inputs = c.Inputs(),
    as_json: c.JsonOpt = False,
) -> None:
    """Routing agreement between two traces of the same tokens: two engines (transformers vs llama.cpp),
    two quantizations, two top-k, two versions of a model.

    The traces must hold the same tokens in the same sequences (and the same token ids, where both recorded
    them: captures do). Per MoE layer: the share of tokens with **identical expert sets**, the mean **overlap**
    |A and B| / min(k) (1 when a top-k reduction keeps the smaller set inside the larger), **top-1**
    agreement, the **gate-weight error** where the sets agree, the number of disagreements and the first
    token that diverges. For each disagreement the **margin** is how close the contested experts' gate scores
    were (from weight ratios against an expert both chose): near-ties (below `--near-tie`) are numerics, large
    margins a real difference in routing. Then the first divergent positions, with both sets.

    Example: `moescope compare hf.zarr llama.zarr --json`
    """
    from moescope.analyze.compare import compare_traces

    traces = [inputs.read_trace(src, "moescope compare", layers) for src in (a, b)]
    result = compare_traces(*traces, near_tie=near_tie, positions=positions, labels=(str(a), str(b)))
    if as_json:
        c.print_json(result.to_dict())
        return
    con = c.console()
    o = result.overall
    con.print(
        f"{result.tokens:,} tokens x {len(result.layers)} layers, top-{result.top_k[0]} vs top-{result.top_k[1]}, "
        f"aligned by {result.aligned_by}: identical sets {_pct(o.identical)}, overlap {_pct(o.overlap)}, "
        f"top-1 {_pct(o.top1)}, {o.disagreements:,} disagreements"
        + ("" if o.near_tie is None else f", {_pct(o.near_tie)} of them near-ties (margin < {near_tie:g})")
    )
    table = Table(
        title="per layer (w err: mean gate-weight error where sets agree; first: the first token whose sets differ)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 0),
        collapse_padding=True,
    )
    cols = ("layer", "same set", "overlap", "top-1", "w err", "differ", "near-tie", "margin p50", "first")
    for col in cols:
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col) + 1)
    for x in (*result.layers, o):
        table.add_row(
            "all" if x is o else str(x.layer_id),
            _pct(x.identical),
            _pct(x.overlap),
            _pct(x.top1),
            "-" if x.weight_error is None else f"{x.weight_error:.1e}",
            f"{x.disagreements:,}",
            _pct(x.near_tie),
            "-" if x.median_margin is None else f"{x.median_margin:.2g}",
            "-" if x.first_divergence is None else f"{x.first_divergence:,}",
        )
    con.print(table)
    if result.divergences:
        div = Table(title="first divergences", title_justify="left")
        for col in ("token", "sequence:position", "layer", "A", "B", "margin"):
            div.add_column(col, justify="right" if col not in ("A", "B") else "left")
        for d in result.divergences:
            div.add_row(
                str(d.token),
                f"{d.sequence}:{d.position}",
                str(d.layer_id),
                str(list(d.a)),
                str(list(d.b)),
                "-" if d.margin is None else f"{d.margin:.3g}",
            )
        con.print(div)
