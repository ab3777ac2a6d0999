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
    capture: Annotated[
        bool, typer.Option("--capture", help="Capture the fixture model's routing afresh first (needs [hf]).")
    ] = False,
    as_json: c.JsonOpt = False,
) -> None:
    """Run the main job on the built-in default data and print where the results are.

    The default data is the routing of the project's own tiny Qwen3-MoE model (trained on offline text)
    over held-out text of five domains, and the model's GGUF. The demo stores the trace, splits it into
    train/test halves, counts and ranks it, runs every analysis, the cache simulations, the placement
    comparison and the llama.cpp offload plan, and writes one self-contained HTML report. With
    `--capture` (and the `[hf]` extra) it first captures the routing afresh from the model.

    Example: `moescope demo --out demo-out`
    """
    from moescope.demo import run_demo

    with c.progress() as bar:
        task = bar.add_task("demo", total=None)
        result = run_demo(out, capture=capture, progress=lambda msg: bar.update(task, description=msg))
    if as_json:
        c.print_json(
            {
                "outputs": {k: str(v) for k, v in result.outputs.items()},
                "info": result.info,
                "layers": result.layers,
                "concentration": result.gate.to_dict(),
                "summary": result.summary,
            }
        )
        return
    con = c.console()
    i = result.info
    con.print(
        c.styled("moescope demo", "bold"),
        f": {i['meta'].get('model')}\n"
        f"{i['tokens']:,} tokens in {i['sequences']:,} sequences ({', '.join(i['labels'])}), "
        f"{i['layers']} MoE layers x {i['n_experts']} experts, top-{i['top_k']}",
        sep="",
    )
    table = Table(title="what the measurements say", title_justify="left", show_lines=True)
    table.add_column("question")
    table.add_column("answer", overflow="fold")
    for question, answer in _verdicts(result):
        table.add_row(question, answer)
    con.print(table)
    con.print(
        c.styled("report", "bold"), f": {result.outputs['report']}  (open it in a browser; it works offline)", sep=""
    )
    con.print("other outputs: " + ", ".join(f"{k} {v}" for k, v in result.outputs.items() if k != "report"))


def _verdicts(result) -> list[tuple[str, str]]:
    g = result.gate
    rows = [
        (
            "Is a per-expert cache worth building?",
            f"{'yes' if g.cache_helps else 'doubtful'}: {g.median_hot_frac:.0%} of the experts carry "
            f"{g.coverage:.0%} of the routing (median over layers; threshold {g.threshold:.0%})",
        )
    ]
    cache = result.summary.get("cache")
    if cache:
        caps = sorted({r["capacity"] for r in cache["rows"]})
        mid = caps[len(caps) // 2]
        at = {r["policy"]: r for r in cache["rows"] if r["capacity"] == mid}
        online = min((r for p, r in at.items() if p != "belady"), key=lambda r: r["demand_miss_rate"])
        rows.append(
            (
                f"What does a cache of {mid} experts per layer buy?",
                f"best online policy {online['policy']}: {online['demand_miss_rate']:.1%} demand misses; LRU "
                f"{at['lru']['demand_miss_rate']:.1%}; Belady floor {at['belady']['demand_miss_rate']:.1%}",
            )
        )
    tl = result.summary.get("timeline")
    if tl:
        mid = tl["budgets"][len(tl["budgets"]) // 2]
        rows.append(("What would a cache buy (decode tokens/s)?", f"{mid['verdict']} ({tl['sizes_from']})"))
    for key, question in (
        ("placement", "Which placement across devices?"),
        ("coact", "Real co-activation?"),
        ("locality", "Temporal locality?"),
    ):
        if key in result.summary and "verdict" in result.summary[key]:
            rows.append((question, result.summary[key]["verdict"]))
    off = result.summary.get("offload")
    if off:
        plan = off["plan"]
        rows.append(
            (
                "llama.cpp offload plan (fixture GGUF)",
                f"{plan['flags']['n_cpu_moe']}  ==  {plan['flags']['override_tensor']}",
            )
        )
    return rows
