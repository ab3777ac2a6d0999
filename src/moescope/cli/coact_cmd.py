"""`moescope coact`: is there real pairwise structure among experts? (thin CLI over `moescope.analyze.coact`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moescope.analyze.coact import DEFAULT_MIN_EXCESS, DEFAULT_N_NULL, DEFAULT_NULL, NULLS
from moescope.cli import _common as c


@c.with_inputs
def coact(
    src: Annotated[Path, typer.Argument(help="A per-token trace (zarr store, .npz, ESFT logs, engine dumps).")],
    groups: Annotated[
        int | None,
        typer.Option("--groups", "-D", help="Expert groups per layer (e.g. devices), E/D experts each; default 8."),
    ] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="Model layer ids to analyse, e.g. 1,3,5-8.")] = None,
    n_null: Annotated[int, typer.Option("--n-null", min=1, help="Null layers drawn per layer (2+ for the z test).")] = (
        DEFAULT_N_NULL
    ),
    null: Annotated[
        str,
        typer.Option(
            "--null",
            help="'swap': selections re-dealt into sets of exactly k; 'shuffle': each expert's selections "
            "moved to random tokens independently (set sizes vary).",
        ),
    ] = DEFAULT_NULL,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seeds the nulls and the clustering restarts.")] = 0,
    min_excess: Annotated[
        float, typer.Option("--min-excess", help="Verdict: a layer is structured when gain / null gain >= this.")
    ] = DEFAULT_MIN_EXCESS,
    matrix_out: Annotated[
        Path | None,
        typer.Option("--matrix-out", help="Write counts, expected, lift [L, E, E] and groups [L, E] to this .npz."),
    ] = None,
    inputs: c.Inputs = c.Inputs(),
    overwrite: c.OverwriteOpt = False,
    as_json: c.JsonOpt = False,
) -> None:
    """Are some experts selected together more than their popularity explains? Co-activation per layer.

    Per layer: counts how often each pair of experts is selected by the same token, splits the experts
    into `--groups` equal groups that hold as many co-selected pairs as possible, and reports the
    **gain**: the share of co-selected pairs inside the groups over the share expected from popularity
    alone (1 = none beyond chance). Groups fitted to noise always find some gain, so the same clustering
    runs on `--n-null` **null** layers with the same per-expert counts but random pairings, and
    **excess** = gain / null gain is the structure left. Verdict: a layer has real pairwise structure when
    excess >= `--min-excess` and the gain clears the null by 5 standard deviations.

    Input: a per-token trace (k >= 2). Output: a table per layer (gain, null gain +- std, excess, share of
    pairs inside groups observed / expected, the pair with the highest lift among pairs seen 25+ times),
    or `--json` (with the groups); `--matrix-out` saves the matrices.

    Example: `moescope coact run.zarr --groups 8 --n-null 3 --matrix-out coact.npz`
    """
    from moescope._atomic import FILE, check_output
    from moescope.analyze.coact import coactivation, write_coact_npz
    from moescope.errors import UsageError
    from moescope.slicing import parse_ranges

    if null not in NULLS:
        raise UsageError(f"--null {null!r} is not one of {', '.join(NULLS)}")
    if matrix_out is not None:
        check_output(matrix_out, overwrite, kind=FILE, inputs=(src, inputs.phys_to_log))
    trace = inputs.read_trace(src, "moescope coact")
    keep = None if layers is None else parse_ranges(layers, "--layers")
    with c.lazy_progress("co-activation") as bar:
        result = coactivation(
            trace,
            groups=groups,
            layers=keep,
            n_null=n_null,
            null=null,
            seed=seed,
            min_excess=min_excess,
            keep_matrices=matrix_out is not None,
            progress=bar,
        )
    if matrix_out is not None:
        write_coact_npz(result, matrix_out, overwrite)
        typer.echo(f"wrote {matrix_out}", err=True)
    if as_json:
        d = result.to_dict()
        for row in d["layers"]:
            row.pop("counts", None)  # the matrices go to --matrix-out, not to stdout
        c.print_json(d)
        return
    sizes = sorted(set(result.group_sizes), reverse=True)
    table = Table(
        title=f"co-activation - {result.model or src.name}: {result.n_groups} groups of "
        f"{'/'.join(map(str, sizes))} of {result.n_experts} experts, top-{result.top_k}, "
        f"{result.n_tokens:,} tokens, {result.null} null x{result.n_null}",
        title_justify="left",
    )
    for col in ("layer", "pair excess", "gain", "null ± std", "excess", "in groups", "top pair", "real"):
        table.add_column(col, justify="right")
    for r in result.layers:
        table.add_row(
            str(r.layer),
            "untested" if r.pair_excess is None else f"{r.pair_excess:.2f}",
            f"{r.gain:.3f}",
            f"{r.null_gain_mean:.3f}" + ("" if r.null_gain_std is None else f"±{r.null_gain_std:.3f}"),
            f"{r.excess:.2f}" + (" *" if r.grouped else ""),
            f"{r.intra_share_observed:.0%}/{r.intra_share_expected:.0%}",
            f"{r.top_pair[0]}-{r.top_pair[1]} {r.top_pair_lift:.1f}x",
            c.styled("yes", "green") if r.structured else "no",
        )
    con = c.console()
    con.print(table)
    verdict = (
        c.styled("real pairwise structure", "green")
        if result.structured
        else c.styled("no real pairwise structure", "yellow")
    )
    pairs = "n/a" if result.median_pair_excess is None else f"{result.median_pair_excess:.2f}"
    con.print(f"{result.structured_layers}/{len(result.layers)} layers structured: ", verdict, ".", sep="", end=" ")
    con.print(
        "Pair test (no group count): "
        f"the most-linked pairs fire together {pairs}x as often as in the null (median; a layer passes at >= "
        f"{result.min_pair_excess:.2f} and null + {result.null_z:.0f} std). {result.n_groups} groups capture it in "
        f"{result.grouped_layers} layers (* excess >= {result.min_excess:.2f}; median gain {result.median_gain:.3f} vs "
        f"null {result.median_null_gain:.3f}, excess {result.median_excess:.3f}); in groups: share of co-selected "
        f"pairs inside the groups, observed/chance."
    )
