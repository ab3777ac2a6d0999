"""`moescope report`: the whole study of one trace as one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moescope.cli import _common as c


@c.with_inputs
def report(
    src: Annotated[Path, typer.Argument(help="A per-token trace (zarr store, .npz, ESFT logs, engine dumps).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
    gguf: Annotated[
        Path | None,
        typer.Option("--gguf", help="The model's GGUF: adds the llama.cpp offload plan and what a cache would buy."),
    ] = None,
    expert_bytes: c.ExpertBytesOpt = None,
    dense_bytes: c.DenseBytesOpt = None,
    machine: Annotated[
        str, typer.Option("--machine", help="Machine preset of the timeline (see moescope simulate --help).")
    ] = "consumer-pcie4",
    vram: Annotated[str | None, typer.Option("--vram", help="VRAM for the offload plan, e.g. 10GiB.")] = None,
    devices: Annotated[str, typer.Option("--devices", help="Device counts for the placement section.")] = "2,4,8",
    title: Annotated[str | None, typer.Option("--title", help="Page title (default: from the model name).")] = None,
    compare: Annotated[
        Path | None,
        typer.Option(
            "--compare",
            help="A trace of the same tokens (another engine, quantization, top-k, version): adds a routing "
            "drift section (as moescope compare).",
        ),
    ] = None,
    inputs: c.Inputs = c.Inputs(),
    overwrite: c.OverwriteOpt = False,
    as_json: c.JsonOpt = False,
) -> None:
    """One self-contained HTML report of a routing study (opens offline in any browser).

    It opens with the verdicts: is a per-expert cache worth building (the concentration gate), what a
    cache of each size buys per policy against the Belady floor, which placement to use for D devices and
    what it saves, and the llama.cpp offload plan and what a per-expert cache would buy in decode tokens/s
    (`moescope simulate`'s timeline) when `--gguf` (or `--expert-bytes`) is given. Then the evidence, each figure
    with one sentence saying what to read from it: load heatmap, coverage curves, co-activation with its
    shuffle null, locality by layer, miss-rate curves per policy, placement comparison. Figures are
    interactive (hover shows layer, expert and value). `--json` prints the numbers behind the page.

    Example: `moescope report run.zarr --gguf model.gguf -o report.html`
    """
    from moescope import _atomic
    from moescope._units import parse_bytes
    from moescope.report import build_report
    from moescope.slicing import parse_ranges

    _atomic.check_output(out, overwrite, kind=_atomic.FILE, inputs=(src, compare, gguf, inputs.phys_to_log))
    trace = inputs.read_trace(src, "the report")
    other = None
    if compare is not None:
        other = inputs.read_trace(compare, "the report's --compare")
        from moescope.analyze.compare import check_aligned

        check_aligned(trace, other)  # refused before the long analyses run
    from moescope.cache.timeline import machine_preset
    from moescope.errors import UsageError

    machine_preset(machine)  # an unknown preset is refused before the long analyses run
    sizes = None
    if expert_bytes is not None:
        eb, dense = c.expert_sizes(trace, expert_bytes, None, dense_bytes)  # flags win over the GGUF's sizes
        sizes = (eb.tolist(), dense, f"--expert-bytes {expert_bytes}, --dense-bytes {dense_bytes or 0}")
    elif dense_bytes is not None:  # the GGUF's expert sizes, this dense figure
        if gguf is None:
            raise UsageError("--dense-bytes prices the cache card with --expert-bytes or --gguf; give one of them")
        eb, dense = c.expert_sizes(trace, None, gguf, dense_bytes)
        sizes = (eb.tolist(), dense, f"the GGUF {gguf.name}, --dense-bytes {dense_bytes}")
    d = parse_ranges(devices, "--devices")
    v = None if vram is None else parse_bytes(vram, "--vram")
    with c.progress() as bar:
        task = bar.add_task("report", total=None)
        result = build_report(
            trace,
            gguf=gguf,
            vram=v,
            devices=d,
            title=title,
            compare=other,
            compare_label=str(compare),
            sizes=sizes,
            machine=machine,
            progress=lambda stage, done, total: bar.update(task, description=stage, completed=done, total=total),
        )
    _atomic.write_text_atomic(out, result.html, overwrite)
    if as_json:
        c.print_json({"report": str(out), **result.summary})
        return
    typer.echo(f"wrote {out} ({len(result.html) / 2**20:.1f} MiB, self-contained)")
