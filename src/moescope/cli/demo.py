"""`moescope demo`: run the main job on the built-in default data and say where the results are."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moescope.cli import _common as c


def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's outputs (replaced if present).")] = Path(
        "demo-out"
    ),
    as_json: c.JsonOpt = False,
) -> None:
    """Run the main job on the built-in default data and print where the results are.

    Today: a seeded synthetic trace with planted structure is written as a store, described, split into
    train/test halves and counted; the measured per-layer skew is shown beside the planted truth.

    Example: [bold]moescope demo --out demo-out[/bold]
    """
    from moescope.demo import DEMO_SPEC, run_demo

    with c.progress() as bar:
        task = bar.add_task("writing demo trace", total=DEMO_SPEC.n_tokens)
        result = run_demo(out, DEMO_SPEC, progress=lambda done, total: bar.update(task, completed=done))
    if as_json:
        c.print_json(
            {
                "outputs": {k: str(v) for k, v in result.outputs.items()},
                "info": result.info,
                "layers": result.layers,
            }
        )
        return
    con = c.console()
    i = result.info
    con.print(
        f"[bold]moescope demo[/bold]: {i['tokens']:,} tokens, {i['sequences']:,} sequences "
        f"({', '.join(i['labels'])}), {i['layers']} MoE layers x {i['n_experts']} experts, top-{i['top_k']}"
    )
    table = Table(title="per-layer load: measured vs planted", title_justify="left")
    for col in ("layer", "top expert share", "planted", "experts for 50% of mass"):
        table.add_column(col, justify="right")
    for r in result.layers:
        table.add_row(
            str(r["layer"]),
            f"{r['top_share']:.2%}",
            f"{r['planted_top_share']:.2%}",
            f"{r['experts_for_half_mass']} / {i['n_experts']}",
        )
    con.print(table)
    con.print(
        "planted = expected share without temporal reuse; reusing the previous token's experts "
        "flattens the top share slightly."
    )
    con.print(f"train/test split: {result.layers[0]['train_tokens']:,} / {result.layers[0]['test_tokens']:,} tokens")
    con.print("[bold]results[/bold]:")
    for name, path in result.outputs.items():
        con.print(f"  {name:7s} {path}")
    con.print(f"next: [bold]moescope trace info {result.outputs['trace']}[/bold]")
