"""`moescope trace ...`: inspect, convert, slice and synthesise routing traces."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from moescope import _atomic
from moescope.cli import _common as c
from moescope.errors import UsageError
from moescope.imports import READERS, WRITERS, as_counts, as_trace, write_output, writer_for
from moescope.info import describe_counts, describe_store, describe_trace
from moescope.slicing import (
    SPLIT_PARTS,
    parse_ranges,
    select_labels,
    select_layers,
    select_sequences,
    select_tokens,
    split_part,
)
from moescope.store import TraceStore, is_store
from moescope.trace import RoutingTrace

trace_app = typer.Typer(
    help="Inspect, convert, slice and synthesise routing traces (the data every analysis reads).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


def _print_info(d: dict[str, Any]) -> None:
    con = c.console()
    meta = d.get("meta", {})
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    if d["kind"] == "trace":
        head.add_row("tokens", f"{d['tokens']:,}")
        head.add_row(
            "sequences",
            f"{d['sequences']:,}  (length min {d['sequence_lengths']['min']}, "
            f"median {d['sequence_lengths']['median']:g}, max {d['sequence_lengths']['max']})",
        )
        head.add_row("phase", d["phase"])
        head.add_row("gate weights", d["weights_dtype"] or "none")
        extras = d.get("extras") or {}
        head.add_row("token ids", "recorded" if "token_ids" in extras else "none")
        others = [f"{name} {tail}" for name, tail in extras.items() if name != "token_ids"]
        if others:
            head.add_row("also", ", ".join(others))
        if d.get("labels"):
            head.add_row("labels", ", ".join(d["labels"]))
        if "complete" in d and not d["complete"]:
            why = d.get("incomplete") or "incomplete: the writer did not close (committed tokens shown)"
            head.add_row("status", c.styled(why, "yellow"))
    else:
        head.add_row("kind", "aggregate counts (no token order)" + (", shares" if d["normalized"] else ""))
        head.add_row("tokens", "unknown" if d["tokens"] is None else f"{d['tokens']:,}")
    head.add_row("layers", f"{d['layers']} MoE layers (ids {_span(d['layer_ids'])})")
    head.add_row("experts", f"{d['n_experts']} per layer, top-{d['top_k'] if d['top_k'] is not None else '?'}")
    for key in ("model", "source", "corpus", "created"):
        if meta.get(key):
            head.add_row(key, str(meta[key]))
    con.print(head)
    table = Table(title="per-layer load", title_justify="left")
    for col in ("layer", "experts used", "top expert", "top share", "min share", "load CV"):
        table.add_column(col, justify="right")
    uniform = 1.0 / d["n_experts"]
    for r in d["layers_summary"]:
        table.add_row(
            str(r["layer"]),
            f"{r['experts_used']}/{d['n_experts']}",
            str(r["top_expert"]),
            f"{r['top_share']:.2%} ({r['top_share'] / uniform:.1f}x)",
            f"{r['min_share']:.2%}",
            f"{r['load_cv']:.2f}",
        )
    con.print(table)


_FOLDER_WRITERS = {"zarr": _atomic.TRACE_STORE, "esft": _atomic.ESFT_LOGS}  # the rest write one file


def _check_output(out: Path, to: str | None, overwrite: bool, *inputs: Path | None) -> None:
    """Refuse, before reading a large input, an output that exists (unless --overwrite, and then only a file or
    a moescope output of the kind the writer makes), or that is an input, lies inside one or holds one."""
    kind = _FOLDER_WRITERS.get(writer_for(out, to).name, _atomic.FILE)
    _atomic.check_output(out, overwrite, kind=kind, inputs=inputs)


def _span(ids: list[int]) -> str:
    if ids and ids == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}..{ids[-1]}"
    return ",".join(map(str, ids))


@trace_app.command("info")
@c.with_inputs
def info(
    path: Annotated[Path, typer.Argument(help="Trace store, .npz, ESFT folder, dump or counts JSON.")],
    model: c.ModelOpt = None,
    mass: c.MassOpt = None,
    inputs: c.Inputs = c.Inputs(),
    as_json: c.JsonOpt = False,
) -> None:
    """Shape, provenance and per-layer load of a trace or counts file.

    A trace store is read chunk by chunk, so this works on traces larger than memory.

    Example: `moescope trace info run.zarr`
    """
    _atomic.recover(path)  # an interrupted replace of `path` is undone before it is read
    if inputs.fmt in (None, "zarr") and is_store(path) and inputs == c.Inputs(fmt=inputs.fmt) and not (model or mass):
        # streams: works on stores larger than memory; an incomplete store says so in its status row
        d = describe_store(TraceStore(path, warn_incomplete=False))
    else:
        data = inputs.read(path, model=model, mass=mass)
        d = describe_trace(data) if isinstance(data, RoutingTrace) else describe_counts(data)
    if as_json:
        c.print_json(d)
    else:
        _print_info(d)


@trace_app.command("convert")
@c.with_inputs
def convert(
    src: Annotated[Path, typer.Argument(help="Input: any readable format (see --from).")],
    out: Annotated[Path, typer.Argument(help="Output: *.zarr (store), *.npz, *.json (counts), or --to.")],
    to: Annotated[str | None, typer.Option("--to", help="Output format: " + ", ".join(sorted(WRITERS)) + ".")] = None,
    model: c.ModelOpt = None,
    mass: c.MassOpt = None,
    inputs: c.Inputs = c.Inputs(),
    overwrite: c.OverwriteOpt = False,
) -> None:
    """Convert between formats: zarr store, .npz, counts JSON, ESFT logs; import engine dumps.

    A trace can become counts (counting selections); counts cannot become a trace (no token order).
    The output is written to a temporary name and renamed into place; the input is never modified, and
    the output may not be the input. `--overwrite` replaces a file, or a folder moescope wrote of the same
    kind (a trace store, ESFT logs), never another folder.

    Examples: `moescope trace convert trace.npz run.zarr` ·
    `moescope trace convert esft_logs/ run.zarr --top-k 6 --n-experts 64`
    """
    _check_output(out, to, overwrite, src, inputs.phys_to_log)  # before reading a large input
    data = inputs.read(src, model=model, mass=mass)
    if isinstance(data, RoutingTrace) and "counts" in writer_for(out, to).accepts:
        data = as_counts(data, mass or "counts")  # a trace becomes counts of the mass asked
    write_output(data, out, to, overwrite)
    typer.echo(f"wrote {out}", err=True)


@trace_app.command("slice")
@c.with_inputs
def slice_(
    src: Annotated[Path, typer.Argument(help="Input trace (any per-token format).")],
    out: Annotated[Path, typer.Argument(help="Output: *.zarr, *.npz, *.json (counts), or --to.")],
    sequences: Annotated[
        str | None, typer.Option("--sequences", help="Sequence indices to keep, e.g. 0-99,150.")
    ] = None,
    tokens: Annotated[str | None, typer.Option("--tokens", help="Token range START:STOP (STOP exclusive).")] = None,
    labels: Annotated[
        str | None, typer.Option("--labels", help="Keep sequences with these labels, e.g. law,intent.")
    ] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="Model layer ids to keep, e.g. 1-4,12.")] = None,
    split: Annotated[
        str | None,
        typer.Option("--split", help="'train' = first half of every sequence, 'test' = second half."),
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="Output format (default: from the suffix).")] = None,
    model: c.ModelOpt = None,
    inputs: c.Inputs = c.Inputs(),
    overwrite: c.OverwriteOpt = False,
) -> None:
    """Cut a trace: by sequences, token range, labels, layers, or the train/test split.

    Selections apply in that order. The split follows the published OLMoE routing study: fit on the
    first half of every sequence (`--split train`), score on the second (`--split test`).

    Example: `moescope trace slice run.zarr test.zarr --labels law --split test`
    """
    if split is not None and split not in SPLIT_PARTS:
        raise UsageError(f"--split {split!r} is not one of {', '.join(SPLIT_PARTS)}")
    if not any(x is not None for x in (sequences, tokens, labels, layers, split)):
        raise UsageError("nothing to slice: give --sequences, --tokens, --labels, --layers or --split")
    _check_output(out, to, overwrite, src, inputs.phys_to_log)
    trace = as_trace(inputs.read(src, model=model), "trace slice")
    if sequences is not None:
        trace = select_sequences(trace, parse_ranges(sequences, "--sequences"))
    if tokens is not None:
        start, sep, stop = tokens.partition(":")
        try:
            lo = int(start) if start.strip() else 0
            hi = int(stop) if sep and stop.strip() else None
        except ValueError:
            raise UsageError(f"--tokens {tokens!r} is not START:STOP with integers, e.g. 0:10000") from None
        trace = select_tokens(trace, lo, hi)
    if labels is not None:
        trace = select_labels(trace, c.names(labels))
    if layers is not None:
        trace = select_layers(trace, parse_ranges(layers, "--layers"))
    if split is not None:
        trace = split_part(trace, split)  # type: ignore[arg-type]
    write_output(trace, out, to, overwrite)
    typer.echo(f"wrote {out}: {trace.n_tokens:,} tokens in {trace.n_sequences:,} sequences", err=True)


@trace_app.command("formats")
def formats(as_json: c.JsonOpt = False) -> None:
    """List the input and output formats moescope reads and writes."""
    rows = [
        {
            "name": r.name,
            "direction": "read" + ("+write" if r.name in WRITERS else ""),
            "produces": r.produces,
            "options": sorted("--" + o.replace("_", "-") for o in r.options),
            "description": r.description,
        }
        for r in READERS.values()
    ]
    rows += [
        {"name": w.name, "direction": "write", "produces": "", "options": [], "description": w.description}
        for w in WRITERS.values()
        if w.name not in READERS
    ]
    if as_json:
        c.print_json(rows)
        return
    table = Table()
    for col in ("format", "direction", "holds", "options", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["direction"], r["produces"], " ".join(r["options"]), r["description"])
    c.console().print(table)


def _floats(text: str, what: str) -> float | tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in c.names(text))
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number or a comma-separated list of numbers") from None
    if not vals:
        raise UsageError(f"{what} is empty; give a number like 1.0")
    return vals[0] if len(vals) == 1 else vals


@trace_app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Output: *.zarr (streamed, bounded memory) or *.npz.")],
    tokens: Annotated[int, typer.Option("--tokens", help="Total tokens.")] = 100_000,
    layers: Annotated[int, typer.Option("--layers", help="MoE layers.")] = 8,
    experts: Annotated[int, typer.Option("--experts", help="Routed experts per layer.")] = 64,
    top_k: Annotated[int, typer.Option("--top-k", help="Experts per token.")] = 8,
    seq_len: Annotated[float, typer.Option("--seq-len", help="Mean tokens per sequence (geometric).")] = 256.0,
    zipf: Annotated[
        str,
        typer.Option("--zipf", help="Popularity skew s (rank^-s), one value or one per layer, e.g. 0.5,1.2."),
    ] = "1.0",
    teams: Annotated[int, typer.Option("--teams", help="Co-activation teams per layer.")] = 0,
    team_size: Annotated[int, typer.Option("--team-size", help="Experts per team.")] = 4,
    team_strength: Annotated[
        float, typer.Option("--team-strength", help="Probability a slot is drawn from the token's team.")
    ] = 0.0,
    stickiness: Annotated[
        float,
        typer.Option("--stickiness", help="Probability a slot reuses one of the previous token's experts."),
    ] = 0.0,
    domains: Annotated[
        str | None, typer.Option("--domains", help="Workload domains (sequence labels), e.g. code,math,chat.")
    ] = None,
    domain_specificity: Annotated[
        float, typer.Option("--domain-specificity", help="0 = domains share preferences, 1 = fully own.")
    ] = 0.5,
    generalists: Annotated[int, typer.Option("--generalists", help="Shared generalist experts per layer.")] = 0,
    generalist_share: Annotated[
        float, typer.Option("--generalist-share", help="Routing mass given to the generalists.")
    ] = 0.0,
    weights: Annotated[str, typer.Option("--weights", help="Gate weight dtype: float16, float32 or none.")] = "float16",
    phase: Annotated[str, typer.Option("--phase", help="prefill or decode.")] = "prefill",
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same trace).")] = 0,
    model: Annotated[str, typer.Option("--model", help="Model name to record.")] = "synthetic",
    overwrite: c.OverwriteOpt = False,
) -> None:
    """Generate a synthetic trace with planted structure (skew, teams, stickiness, domains, generalists).

    The planted truth is stored in the trace metadata (meta.synth.truth), so analyses can be checked by
    recovering it. Deterministic for a seed, whatever the chunking; a .zarr output is streamed.

    Example: `moescope trace synth s.zarr --tokens 1000000 --layers 48 --teams 8 --team-strength 0.6`
    """
    from moescope.synth import SynthSpec, save_synth, synth_trace

    _check_output(out, None, overwrite)
    spec = SynthSpec(
        n_tokens=tokens,
        n_layers=layers,
        n_experts=experts,
        top_k=top_k,
        seq_len=seq_len,
        seed=seed,
        zipf=_floats(zipf, "--zipf"),
        n_teams=teams,
        team_size=team_size,
        team_strength=team_strength,
        stickiness=stickiness,
        domains=tuple(c.names(domains) or ()),
        domain_specificity=domain_specificity,
        n_generalists=generalists,
        generalist_share=generalist_share,
        weights_dtype=None if weights == "none" else weights,
        phase=phase,
        model=model,
    )
    if writer_for(out).name == "zarr":
        with c.progress() as bar:
            task = bar.add_task("synthesising", total=spec.n_tokens)
            save_synth(spec, out, overwrite=overwrite, progress=lambda done, _: bar.update(task, completed=done))
    else:
        write_output(synth_trace(spec), out, None, overwrite)
    typer.echo(f"wrote {out}: {tokens:,} tokens x {layers} layers x top-{top_k} of {experts}", err=True)


def import_(
    fmt: Annotated[str, typer.Argument(help="Source format: " + ", ".join(sorted(READERS)) + ".")],
    src: Annotated[Path, typer.Argument(help="The file or folder to import.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write it (*.zarr, *.npz, *.json); without: describe it.")
    ] = None,
    n_experts: c.NExpertsOpt = None,
    top_k: c.TopKOpt = None,
    moe_layers: c.MoeLayersOpt = None,
    phys_to_log: c.PhysToLogOpt = None,
    model: c.ModelOpt = None,
    mass: c.MassOpt = None,
    phase: c.PhaseOpt = None,
    overwrite: c.OverwriteOpt = False,
    as_json: c.JsonOpt = False,
) -> None:
    """Import routing data from an engine or tool: describe it, or write it with `--out`.

    The same readers as `moescope trace convert --from FORMAT`, named up front. Aggregate sources
    (imatrix GGUFs, SGLang CSV/stat dumps, counts JSON) become counts; per-token sources become traces.

    Examples: `moescope import imatrix model.imatrix.gguf -o counts.json` ·
    `moescope import vllm routed.npz --n-experts 128 -o run.zarr`
    """
    if fmt not in READERS:
        raise UsageError(f"unknown format {fmt!r}; expected one of: {', '.join(sorted(READERS))}")
    inputs = c.Inputs(fmt, n_experts, top_k, moe_layers, phys_to_log, phase)
    if out is not None:
        convert.__wrapped__(src, out, to=None, model=model, mass=mass, inputs=inputs, overwrite=overwrite)
    else:
        info.__wrapped__(src, model=model, mass=mass, inputs=inputs, as_json=as_json)
