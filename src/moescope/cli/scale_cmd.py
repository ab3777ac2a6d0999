"""`moescope analyze`: every count-based analysis of a (large) trace store, chunk by chunk, here or on Dask."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from moescope.cli import _common as c
from moescope.scale import ANALYSES

_ONLY_HELP = "Analyses, comma-separated (default: every one the store allows): " + ", ".join(
    f"{n} ({a.summary})" for n, a in ANALYSES.items()
)


def analyze(
    store: Annotated[
        str,
        typer.Argument(
            help="A trace store: a zarr folder (`moescope trace convert` makes one) or an fsspec URL "
            "(s3://bucket/run.zarr; the protocol's package installed)."
        ),
    ],
    only: Annotated[str | None, typer.Option("--only", help=_ONLY_HELP)] = None,
    scheduler: c.SchedulerOpt = None,
    chunk_tokens: Annotated[int, typer.Option("--chunk-tokens", min=1, help="Target tokens per chunk.")] = 1 << 17,
    layers: Annotated[str | None, typer.Option("--layers", help="Model layer ids to keep, e.g. 1-4,12.")] = None,
    follow: Annotated[
        bool,
        typer.Option("--follow", help="Keep analysing a store that a capture is still writing, until it closes."),
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="--follow: seconds between looks for new commits.")
    ] = 10.0,
    include_open: Annotated[
        bool,
        typer.Option(
            "--include-open",
            help="Store still open: also take its last sequence as committed so far (it may go on).",
        ),
    ] = False,
    as_json: c.JsonOpt = False,
) -> None:
    """Every count-based analysis of a trace store, in bounded memory, in this process or on a Dask cluster.

    The store is read in chunks of whole sequences; each chunk becomes partial sums (counts, co-activation
    pairs, reuse and gap histograms, train-half tables, then test-half hits) that add up exactly, so the
    results equal the whole-trace analyses and do not depend on the executor. `--scheduler local:2` runs a
    2-worker LocalCluster; `--scheduler tcp://host:8786` uses an existing cluster (its workers must see
    the store's path, e.g. shared storage).

    A store that a capture is still writing can be analysed: only committed tokens are read, and of
    those only finished sequences (all but the last committed one; `--include-open` takes that one too,
    cut where the commit stands). `--follow` keeps the running sums and, every `--interval` seconds,
    adds the sequences finished since, printing the results again (one JSON object per line with
    `--json`); it stops when the capture closes the store (or on Ctrl-C) and prints the final results.
    While following, `prefetch` (its second pass needs tables learned from every token) waits for the end.

    Example: `moescope analyze big.zarr --scheduler local:2 --json`
    """
    import time

    from moescope.errors import UsageError
    from moescope.scale import ChunkedRun
    from moescope.slicing import parse_ranges

    if follow and include_open:
        raise UsageError("--follow reads finished sequences only; drop --include-open (it is for one-off runs)")
    names = c.names(only)
    lids = None if layers is None else parse_ranges(layers, "--layers")
    opts = dict(scheduler=scheduler, chunk_tokens=chunk_tokens, layers=lids, include_open=include_open)
    with ChunkedRun(store, names, **opts) as run:
        if not follow:
            with c.lazy_progress("chunks") as bar:
                run.update(bar)
                res = run.results(bar)
            _emit(run, res, store, as_json, lines=False)
            return
        shown = -1
        try:
            while True:
                run.update()
                if run.complete or not run.writing:  # closed, or its writer is gone: it will not grow
                    break
                if run.tokens > shown and run.tokens > 0:
                    _emit(run, run.results(one_pass_only=True), store, as_json, lines=True)
                    shown = run.tokens
                time.sleep(interval)
        except KeyboardInterrupt:
            typer.echo(f"stopped following; final results over the {run.tokens:,} tokens analysed", err=True)
        with c.lazy_progress("final pass") as bar:
            res = run.results(bar)
        _emit(run, res, store, as_json, lines=True)


def _emit(run: Any, res: dict[str, Any], store: str, as_json: bool, lines: bool) -> None:
    """Print one set of results: a table, or JSON (one line each when following)."""
    state = {
        "tokens_analysed": run.tokens,
        "tokens_committed": run.committed,
        "store_complete": run.complete,
        "store_writing": run.writing,
    }
    if as_json:
        obj = {"store": state, **{name: _jsonable(v) for name, v in res.items()}}
        (c.print_json_line if lines else c.print_json)(obj)
        return
    note = "" if run.complete else (
        f" of {run.committed:,} committed; "
        + ("the capture is still writing" if run.writing else "INCOMPLETE: its writer stopped without closing it")
        + (" (last sequence as committed so far)" if run.include_open else " (finished sequences only)")
    )  # fmt: skip
    name = store.rstrip("/").rsplit("/", 1)[-1]
    table = Table(title=f"{name}: chunked analyses of {run.tokens:,} tokens{note}", title_justify="left")
    table.add_column("analysis")
    table.add_column("result", overflow="fold")
    for name, v in res.items():
        table.add_row(name, _line(name, v))
    c.console().print(table)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "summary") and callable(v.summary):  # ExpertCounts: the summary and the counts themselves
        return {**v.summary(), "values": v.values}
    return v


def _line(name: str, v: Any) -> str:
    if name == "counts":
        return f"{v.tokens:,} tokens x {v.n_layers} layers, {int(v.values.sum()):,} selections"
    if name == "gate":
        share = np.sort(v.values, axis=1)[:, ::-1] / np.maximum(v.values.sum(axis=1, keepdims=True), 1e-300)
        top = max(1, v.n_experts // 8)
        return f"gate mass {float(v.values.sum()):,.1f}; top 1/8 of experts hold {np.median(share[:, :top].sum(1)):.1%}"
    if name == "concentration":
        return (
            f"median hot fraction {v.median_hot_frac:.1%} for {v.coverage:.0%} coverage: cache helps = {v.cache_helps}"
        )
    if name == "ranking":
        return f"hottest expert per layer: {v.order[:, 0].tolist()[:12]}{' ...' if v.order.shape[0] > 12 else ''}"
    if name == "coact":
        return (f"{v.structured_layers}/{len(v.layers)} layers structured; median gain {v.median_gain:.2f} vs null "
                f"{v.median_null_gain:.2f} (excess {v.median_excess:.2f})")  # fmt: skip
    if name == "temporal":
        from moescope.analyze.locality import reuse_sentence

        gap = v.summary["median_gap"].median
        return (
            f"{reuse_sentence(v.summary)}; "
            f"median gap {gap if gap is not None else float('nan'):.0f} tokens; "
            f"working set {v.summary['working_set_frac'].median:.0%} of experts per sequence"
        )
    if name == "prefetch":
        pre, cross = v
        rates = [r.to_dict()["hit_rate"] for r in pre]
        parts = [f"{p} " + "/".join(f"{np.mean([r[p][b] for r in rates]):.0%}" for b in range(len(rates[0][p])))
                 for p in rates[0]]  # fmt: skip
        prec = np.mean([x.precision for x in cross]) if cross else float("nan")
        return (
            f"next-token hit rate per budget (mean over layers): {', '.join(parts)}; cross-layer precision {prec:.0%}"
        )
    return str(v)
