"""`moescope locality`: temporal and cross-layer locality and prefetch hit rates (thin CLI over
`moescope.analyze.locality`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from moescope.analyze.prefetch import PREDICTORS
from moescope.cli import _common as c

_PREDICTOR_HELP = "; ".join((fn.__doc__ or name).strip().rstrip(".") for name, fn in PREDICTORS.items())


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


@c.with_inputs
def locality(
    src: Annotated[
        Path, typer.Argument(help="A per-token trace: zarr store, .npz, ESFT logs, vLLM / SGLang per-token dumps.")
    ],
    layers: Annotated[
        str | None, typer.Option("--layers", help="Model layer ids to analyse, e.g. 1-4,12 (default: all).")
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option("--budget", help="Experts prefetched per token, e.g. 8,16,32 (default: k, 2k, 4k)."),
    ] = None,
    predictor: Annotated[
        str, typer.Option("--predictor", help=f"Prefetch predictors to score, comma-separated. {_PREDICTOR_HELP}.")
    ] = ",".join(PREDICTORS),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the within-sequence shuffle baseline.")] = 0,
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="Also print the prefetch hit rates of every layer.")
    ] = False,
    model_name: Annotated[str | None, typer.Option("--model-name", help="Model name for the report.")] = None,
    inputs: c.Inputs = c.Inputs(),
    as_json: c.JsonOpt = False,
) -> None:
    """Do consecutive tokens reuse experts, and how much of the next token's experts can be prefetched?

    Per layer, within sequences only: **next-token reuse** (the share of a token's k experts that the
    previous token also used) against the same sequences with their tokens shuffled (the exact
    expectation; a seeded shuffle is in the JSON), tokens drawn independently, and uniform routing k/E;
    the **reuse distance** (tokens since the expert was last used in the sequence: median, cold share,
    log2 histogram in the JSON); the **working set** (distinct experts per sequence, and per window of
    w tokens against the shuffle).

    **Cross-layer**: layer l's experts predicting layer l+1's for the same token (precision@k) against
    layer l+1's most frequent experts and chance. **Prefetch**: each predictor names B experts for the
    next token; the hit rate is the share of its k experts among them. Everything predictive is learned
    on the first half of every sequence and scored on the second half; chance is B/E.

    Example: `moescope locality run.zarr --budget 8,16,32 --predictor lfu,coact --per-layer`
    """
    from moescope.analyze.locality import locality as run_locality
    from moescope.analyze.locality import reuse_sentence
    from moescope.errors import UsageError
    from moescope.slicing import parse_ranges

    budgets = None if budget is None else parse_ranges(budget, "--budget")
    predictors = c.names(predictor)
    if not predictors:
        raise UsageError(f"--predictor {predictor!r} names no predictor; pick from {', '.join(PREDICTORS)}")
    trace = inputs.read_trace(src, "locality", layers)
    with c.lazy_progress("locality (layers)") as progress:
        result = run_locality(
            trace, budgets=budgets, predictors=predictors, seed=seed, model=model_name, progress=progress
        )
    if as_json:
        c.print_json(result.to_dict())
        return
    con = c.console()
    s = result.summary
    k, n_exp = result.top_k, result.n_experts
    w = 16 if 16 in result.widths else result.widths[-1]
    wi = result.widths.index(w)

    t1 = Table(title=f"temporal locality - {result.model or src.name}", title_justify="left")
    for col in ("layer", "reuse", "shuffled", "indep.", "uniform", "x shuffled", "median gap", "cold",
                "working set", f"W({w})", f"W({w}) shuf."):  # fmt: skip
        t1.add_column(col, justify="right")
    for r in result.layers:
        t1.add_row(
            str(r.layer), _pct(r.reuse), _pct(r.reuse_shuffled_expected), _pct(r.reuse_independent),
            _pct(r.reuse_uniform), _num(r.reuse_ratio, ".2f"), _num(r.median_gap, "g"), _pct(r.cold_share),
            f"{r.working_set_mean:.1f} ({r.working_set_frac:.0%})", _num(r.window[wi]), _num(r.window_shuffled[wi]),
        )  # fmt: skip
    con.print(t1)
    con.print(
        f"{result.tokens:,} tokens in {result.sequences:,} sequences, top-{k} of {n_exp}: {reuse_sentence(s)} "
        f"(uniform {_pct(s['reuse_uniform'].median)}); a sequence touches "
        f"{_num(s['working_set_mean'].median)} of {n_exp} experts per layer."
    )

    if result.cross:
        t2 = Table(title=f"cross-layer prediction, precision@{k} (test split)", title_justify="left")
        for col in ("layer -> next", "precision", "frequency", "chance", "lift"):
            t2.add_column(col, justify="right")
        for x in result.cross:
            lift = x.precision / x.frequency if x.frequency > 0 else None
            t2.add_row(
                f"{x.layer} -> {x.next_layer}", _pct(x.precision), _pct(x.frequency), _pct(x.chance),
                _num(lift, ".2f"),
            )  # fmt: skip
        con.print(t2)
        con.print(
            f"Median over layer pairs: the top-{k} by train cross-layer counts from layer l's experts hold "
            f"{_pct(s['cross_precision'].median)} of layer l+1's vs "
            f"{_pct(s['cross_frequency'].median)} from layer l+1's train frequencies alone (chance {k / n_exp:.1%})."
        )

    t3 = Table(title="next-token prefetch hit rate", title_justify="left")
    t3.add_column("predictor")
    for b in result.budgets:
        t3.add_column(f"B={b}", justify="right")
    for p in result.predictors:
        t3.add_row(p, *(_pct(x.mean) for x in result.prefetch_overall[p]))
    t3.add_row("chance", *(_pct(x) for x in result.prefetch_chance), style="dim")
    con.print(t3)
    overall = result.prefetch_overall
    best = max(result.predictors, key=lambda p: overall[p][0].mean or 0.0)
    ref = f", LFU {_pct(overall['lfu'][0].mean)}" if "lfu" in result.predictors and best != "lfu" else ""
    con.print(
        f"Mean over layers; learned on the first half of every sequence, scored on the second "
        f"({result.test_pairs:,} token pairs per layer). At B={result.budgets[0]}: {best} prefetches "
        f"{_pct(overall[best][0].mean)} of the next token's experts{ref}, chance {_pct(result.prefetch_chance[0])}."
    )

    if result.lookahead:
        _print_lookahead(con, result)

    if per_layer:
        t4 = Table(title=f"hit rate per layer, B = {' / '.join(map(str, result.budgets))}", title_justify="left")
        t4.add_column("layer", justify="right")
        for p in result.predictors:
            t4.add_column(p, justify="right")
        for r in result.prefetch:
            t4.add_row(str(r.layer), *(" / ".join(f"{x:.0%}" for x in r.hit_rate[p]) for p in result.predictors))
        con.print(t4)


def _print_lookahead(con, result) -> None:
    """The captured lookahead's recall per layer and distance, beside the best id-only predictor (budget k)."""
    t = Table(
        title=f"lookahead: the later routers on this layer's router input, recall@{result.top_k} (test halves)",
        title_justify="left",
    )
    for col in ("layer -> target", "distance", "lookahead", "best id-only (B=k)", "id-only rate"):
        t.add_column(col, justify="right")
    for r in result.lookahead:
        best = r.best_id_only
        t.add_row(
            f"{r.layer} -> {r.target}", str(r.distance), _pct(r.recall),
            "-" if best is None else best[0], "-" if best is None else _pct(best[1]),
        )  # fmt: skip
    con.print(t)
    parts = []
    for d in sorted({r.distance for r in result.lookahead}):
        rows = [r for r in result.lookahead if r.distance == d]
        ids = [r.best_id_only[1] for r in rows if r.best_id_only is not None]
        parts.append(
            f"distance {d}: lookahead {_pct(float(np.median([r.recall for r in rows])))}"
            + (f" vs best id-only {_pct(float(np.median(ids)))}" if ids else "")
        )
    con.print("Median over layers: " + "; ".join(parts) + ".")
