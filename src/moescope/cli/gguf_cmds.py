"""`moescope gguf inspect` and `moescope split`: act on GGUF model files (thin CLI over `moescope.gguf`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moescope.cli import _common as c

gguf_app = typer.Typer(
    help="Read GGUF model files: what the experts weigh, layer by layer.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

ModelArg = Annotated[Path, typer.Argument(help="A GGUF model file (read through a memory map, never modified).")]


@gguf_app.command("inspect")
def inspect(model: ModelArg, as_json: c.JsonOpt = False) -> None:
    """What a GGUF says about its experts: architecture, expert count and top-k, shared experts, leading dense
    blocks, per-layer tensors with types and bytes, bytes per routed expert, experts vs the rest.

    Example: `moescope gguf inspect Qwen3-30B-A3B-Q4_K_M.gguf --json`
    """
    from moescope._units import format_bytes
    from moescope.gguf import inspect_gguf

    m = inspect_gguf(model)
    if as_json:
        c.print_json(m.to_dict())
        return
    con = c.console()
    con.print(
        f"{m.name or model.name}: {m.architecture}, {m.n_blocks} blocks, {len(m.layer_ids)} MoE "
        f"(first {m.layer_ids[0]}), {m.n_experts} experts, top-{m.top_k}, {m.shared_experts} shared; "
        f"routed experts {format_bytes(m.routed_expert_bytes)}, everything else {format_bytes(m.other_bytes)}"
    )
    table = Table(title="per MoE block", title_justify="left")
    for col in ("block", "bytes / expert", "expert tensors", "router"):
        table.add_column(col, justify="right" if col != "expert tensors" else "left")
    for b in m.layer_ids:
        ts = [t for t in m.tensors if t.block == b and t.per_expert]
        router = next((t for t in m.tensors if t.name == f"blk.{b}.ffn_gate_inp.weight"), None)
        table.add_row(
            str(b),
            format_bytes(m.expert_bytes[b]),
            ", ".join(f"{t.name.split('.', 2)[2]} {t.type} {list(t.shape)}" for t in ts),
            "" if router is None else router.type,
        )
    con.print(table)


def split(
    model: ModelArg,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Existing folder for the group GGUFs and split.json.")],
    groups: Annotated[int, typer.Option("--groups", "-g", min=1, help="Number of output GGUFs (G).")] = 2,
    mode: Annotated[
        str, typer.Option("--mode", help="contiguous | balanced | ranked | custom (see above).")
    ] = "contiguous",
    ranking: Annotated[
        Path | None, typer.Option("--ranking", help="Ranking CSV (`moescope rank TRACE -o`): balanced, ranked, core.")
    ] = None,
    groups_file: Annotated[
        Path | None, typer.Option("--groups-file", help='custom mode: {"groups": [{"<block>": [ids]}, ...]}.')
    ] = None,
    core: Annotated[int, typer.Option("--core", min=0, help="Each layer's N hottest experts go into every group.")] = 0,
    overwrite: c.OverwriteOpt = False,
    as_json: c.JsonOpt = False,
) -> None:
    """Split a GGUF MoE model into G GGUFs, each holding a subset of every layer's experts (for several
    machines, or to test which expert groups can stand alone).

    Modes: `contiguous` (id ranges), `balanced` (near-equal routing load per group, from `--ranking`),
    `ranked` (a snake draft down each layer's ranking), `custom` (`--groups-file`). Subsets may differ per
    layer; rankings are per layer. `--core N` replicates each layer's N hottest experts into every group.
    Per-expert tensors are sliced along the expert dimension (any quantisation), router rows gathered,
    `expert_count` set and `expert_used_count` lowered where needed; everything else is copied untouched.
    Writes `<model>.group-<g>-of-<G>.gguf` and `split.json` (new expert id -> source id) into `--out`.

    Example: `moescope rank run.zarr -o ranking.csv`, then
    `moescope split model.gguf -o parts/ -g 2 --mode ranked --ranking ranking.csv --core 4`
    """
    from moescope.analyze import read_ranking_csv
    from moescope.gguf import inspect_gguf
    from moescope.gguf.split import plan_groups, split_gguf

    m = inspect_gguf(model)
    rk = None if ranking is None else read_ranking_csv(ranking)
    plan = plan_groups(m, groups, mode, ranking=rk, custom=groups_file, core=core)
    with c.lazy_progress("writing") as bar:
        result = split_gguf(model, out_dir, plan, overwrite=overwrite, progress=bar)
    if as_json:
        c.print_json(result.to_dict())
        return
    for p in result.paths:
        typer.echo(f"wrote {p}")
    typer.echo(f"wrote {result.manifest}")
