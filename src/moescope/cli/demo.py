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

    The default data is the routing of the project's own tiny Qwen3-MoE model (trained on offline text)
    over held-out text of five domains. Today the demo stores it, describes it, splits it into
    train/test halves, counts it and runs the concentration gate; later releases add the other analyses,
    simulations, plans and a report.

    Example: `moescope demo --out demo-out`
    """
    from moescope.demo import run_demo

    result = run_demo(out)
    if as_json:
        c.print_json(
            {
                "outputs": {k: str(v) for k, v in result.outputs.items()},
                "info": result.info,
                "layers": result.layers,
                "concentration": result.gate.to_dict(),
            }
        )
        return
    con = c.console()
    i = result.info
    con.print(
        f"[bold]moescope demo[/bold]: {i['meta'].get('model')}\n"
        f"{i['tokens']:,} tokens in {i['sequences']:,} sequences ({', '.join(i['labels'])}), "
        f"{i['layers']} MoE layers x {i['n_experts']} experts, top-{i['top_k']}"
    )
    table = Table(title="per-layer routing", title_justify="left")
    for col in ("layer", "top share (x uniform)", "experts for 90%", "hottest expert per domain"):
        table.add_column(col, justify="left" if col.startswith("hottest") else "right")
    for r in result.layers:
        table.add_row(
            str(r["layer"]),
            f"{r['top_share']:.1%} ({r['top_share'] * i['n_experts']:.1f}x)",
            f"{r['experts_for_90pct']} / {i['n_experts']}",
            "  ".join(f"{lab} {e}" for lab, e in r["top_expert_by_label"].items()),
        )
    con.print(table)
    g = result.gate
    con.print(
        f"concentration gate: {g.median_hot_frac:.0%} of the experts (median over layers) carry {g.coverage:.0%} "
        f"of the routing, so a per-expert cache {'helps' if g.cache_helps else 'helps little'} "
        f"(threshold {g.threshold:.0%}; details: [bold]moescope concentration[/bold])"
    )
    con.print("[bold]results[/bold]:")
    for name, path in result.outputs.items():
        con.print(f"  {name:7s} {path}")
    con.print(f"next: [bold]moescope trace info {result.outputs['trace']}[/bold]")
