"""`moescope concentration` (and the other analyses as they land): thin CLI over `moescope.analyze`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from moescope.cli import _common as c


@c.with_inputs
def concentration(
    src: Annotated[Path, typer.Argument(help="A trace (any format), counts JSON, or an imatrix GGUF.")],
    coverage: Annotated[
        float, typer.Option("--coverage", help="Share of routing mass the resident experts must cover.")
    ] = 0.90,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Verdict: a cache helps when the median hot fraction is below this.")
    ] = 0.25,
    mass: c.MassOpt = None,
    model_name: Annotated[str | None, typer.Option("--model-name", help="Model name for the report.")] = None,
    inputs: c.Inputs = c.Inputs(),
    as_json: c.JsonOpt = False,
) -> None:
    """Should you build a per-expert cache? The concentration gate, per layer and overall.

    Per layer: the fraction of experts that must be resident, hottest first, to cover `--coverage` of the
    routing mass; 1 - normalised entropy; the top expert's share; the Gini coefficient. Verdict: a cache
    helps when the median hot fraction is below `--threshold`. Mass is selections (`--mass counts`) or
    gate weight (`--mass gate`, needs weights or a gate-weighted counts table). A frequency view only:
    temporal reuse and real cache policies are measured by other commands.

    Example: `moescope concentration run.zarr --coverage 0.9 --mass gate`
    """
    from moescope.analyze import concentration as gate
    from moescope.imports import as_counts

    data = inputs.read(src, mass=mass)
    result = gate(as_counts(data, mass or "counts"), coverage=coverage, threshold=threshold, model=model_name)
    if as_json:
        c.print_json(result.to_dict())
        return
    con = c.console()
    table = Table(
        title=f"concentration ({result.mass} mass, {result.coverage:.0%} coverage) - {result.model or src.name}",
        title_justify="left",
    )
    for col in ("layer", "hot experts", "hot fraction", "concentration", "top share", "Gini"):
        table.add_column(col, justify="right")
    for r in result.layers:
        table.add_row(
            str(r.layer),
            f"{r.hot_experts}/{result.n_experts}",
            f"{r.hot_frac_for_coverage:.1%}",
            f"{r.concentration_score:.3f}",
            f"{r.top_share:.1%}",
            f"{r.gini:.3f}",
        )
    con.print(table)
    verdict = c.styled("a per-expert cache helps", "green")
    if not result.cache_helps:
        verdict = c.styled("a per-expert cache helps little", "yellow")
    con.print(
        Text.assemble(
            f"median hot fraction {result.median_hot_frac:.1%} vs threshold {result.threshold:.0%}: ",
            verdict,
            f" (median concentration {result.median_concentration:.3f})",
        )
    )


@c.with_inputs
def rank(
    src: Annotated[Path, typer.Argument(help="A trace (any format) or selection counts (counts JSON, imatrix GGUF).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="CSV: layer,expert,rank,count,gate_mass,share.")
    ] = None,
    by: Annotated[str, typer.Option("--by", help="Rank by 'counts' (selections) or 'gate' (gate mass).")] = "counts",
    group_top: Annotated[
        int | None,
        typer.Option("--group-top", min=1, help="Also: what each layer's N hottest experts keep (group mass)."),
    ] = None,
    groups_file: Annotated[
        Path | None,
        typer.Option("--groups-file", help='Also: group mass of subsets {"groups": [{"<layer>": [ids]}, ...]}.'),
    ] = None,
    inputs: c.Inputs = c.Inputs(),
    overwrite: c.OverwriteOpt = False,
    as_json: c.JsonOpt = False,
) -> None:
    """Rank every layer's experts, hottest first, by selections or gate mass.

    Rankings are per layer (expert 5 of layer 3 is not expert 5 of layer 4). With `--out` the ranking is
    written as CSV (the ranking format the expert-split and placement planners read); without it,
    the top experts of each layer are printed. `--group-top N` (or `--groups-file`, the format `moescope
    split --mode custom` reads) adds the group mass of each subset: the share of routing selections it
    holds and the share of tokens whose whole top-k lies inside it (what an expert-split group serving
    only that subset could answer alone); both need a per-token trace.

    Example: `moescope rank run.zarr --by gate -o ranking.csv --group-top 16`
    """
    from moescope._atomic import FILE, check_output
    from moescope.analyze import rank_experts, write_ranking_csv

    if out is not None:
        check_output(out, overwrite, kind=FILE, inputs=(src, groups_file, inputs.phys_to_log))
    data = inputs.read(src)
    ranking = rank_experts(data, by)
    groups = _groups(ranking, group_top, groups_file)
    masses = []
    if groups:
        from moescope.analyze import group_mass
        from moescope.imports import as_trace

        trace = as_trace(data, "group mass")
        masses = [group_mass(trace, g) for g in groups]
    if out is not None:
        write_ranking_csv(ranking, out, overwrite)
        typer.echo(f"wrote {out}", err=True)
    if as_json:
        d = ranking.to_dict()
        if masses:
            d["group_mass"] = [m.to_dict() for m in masses]
        c.print_json(d)
        return
    con = c.console()
    if out is None:
        table = Table(title=f"experts by {by}, hottest first (share)", title_justify="left")
        table.add_column("layer", justify="right")
        table.add_column("top experts")
        rows = ranking.rows()
        for lid in ranking.layer_ids.tolist():
            top = [r for r in rows if r[0] == lid][:8]
            table.add_row(str(lid), "  ".join(f"{r[1]} ({r[5]:.1%})" for r in top))
        con.print(table)
    for gi, m in enumerate(masses):
        what = f"the {group_top} hottest experts" if groups_file is None else f"group {gi + 1}"
        gt = Table(title=f"group mass of {what} per layer", title_justify="left")
        for col in ("layer", "experts", "routing mass kept", "tokens fully inside"):
            gt.add_column(col, justify="right")
        for lid, size, ms, full in zip(m.layer_ids, m.group_size, m.mass_share, m.full_token_share, strict=True):
            gt.add_row(str(lid), str(size), f"{ms:.1%}", f"{full:.1%}")
        con.print(gt)


def _groups(ranking, group_top: int | None, groups_file: Path | None) -> list[dict[int, list[int]]]:
    """Expert subsets per layer from --group-top or --groups-file (split's custom JSON)."""
    from moescope.analyze.ranking import read_groups_file
    from moescope.errors import UsageError

    if group_top is not None and groups_file is not None:
        raise UsageError("give --group-top or --groups-file, not both")
    if group_top is not None:
        return [{int(lid): ranking.top(int(lid), group_top) for lid in ranking.layer_ids}]
    return [] if groups_file is None else read_groups_file(groups_file)
