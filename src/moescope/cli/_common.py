"""Shared CLI pieces: global state, the input options every reading command takes, output helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moescope.imports import READERS, ImportOptions
from moescope.slicing import parse_ranges


@dataclasses.dataclass
class _State:
    verbose: bool = False
    quiet: bool = False


STATE = _State()

# -- options shared by every command that reads routing data --------------------------------------
FromOpt = Annotated[
    str | None,
    typer.Option(
        "--from",
        help="Input format; detected from the path when omitted. One of: " + ", ".join(sorted(READERS)) + ".",
        show_default=False,
    ),
]
NExpertsOpt = Annotated[
    int | None,
    typer.Option("--n-experts", min=1, help="Routed experts per layer, for sources that do not record it."),
]
TopKOpt = Annotated[
    int | None,
    typer.Option("--top-k", min=1, help="Experts per token, for sources that flatten ids (ESFT logs)."),
]
MoeLayersOpt = Annotated[
    str | None,
    typer.Option(
        "--moe-layers",
        help="Indices along the source's layer axis to keep, e.g. 1-26 (vLLM/SGLang dumps include dense layers).",
    ),
]
PhysToLogOpt = Annotated[
    Path | None,
    typer.Option("--phys-to-log", help="Physical-to-logical expert map [layers, physical] (.npy/.json), SGLang."),
]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Model name to record in the metadata.")]
MassOpt = Annotated[
    str | None,
    typer.Option(
        "--mass",
        help="Routing mass: 'counts' (selections) or 'gate' (summed gate weights). What a counts file is read "
        "as, and what a trace is counted as when it becomes counts (gate needs weights).",
    ),
]
PhaseOpt = Annotated[
    str | None,
    typer.Option(
        "--phase",
        help="'prefill' or 'decode': which passes to import from mixed dumps; the phase of an .npz that records none.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON (for scripts).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="Run on Dask (extra [dask]): 'local:N' (a LocalCluster of N workers) or a scheduler address.",
    ),
]


def read_trace(
    src: Path,
    fmt: str | None,
    purpose: str,
    *,
    n_experts: int | None = None,
    top_k: int | None = None,
    moe_layers: str | None = None,
    phys_to_log: Path | None = None,
    phase: str | None = None,
    layers: str | None = None,
) -> Any:
    """The per-token trace a command analyses: `src` read with the import flags, refused with `purpose` in
    the message when it holds only counts, then cut to ``--layers`` (model layer ids) when given."""
    from moescope.imports import as_trace, read_input
    from moescope.slicing import select_layers

    opts = import_options(n_experts, top_k, moe_layers, phys_to_log, None, None, phase)
    trace = as_trace(read_input(src, fmt, opts), purpose)
    return trace if layers is None else select_layers(trace, parse_ranges(layers, "--layers"))


def reader_mass(src: Path, fmt: str | None, mass: str | None) -> tuple[str, str | None]:
    """``(format name, mass for the reader)``: `--mass` goes to counts readers (which file column to read);
    a per-token source is read whole and counted with it afterwards (`imports.as_counts`)."""
    from moescope.imports import detect_format

    name = fmt or detect_format(src)
    reader = READERS.get(name)
    return name, mass if reader is not None and reader.produces == "counts" else None


def import_options(
    n_experts: int | None = None,
    top_k: int | None = None,
    moe_layers: str | None = None,
    phys_to_log: Path | None = None,
    model: str | None = None,
    mass: str | None = None,
    phase: str | None = None,
) -> ImportOptions:
    """Build `ImportOptions` from the CLI flags (validating the enumerations)."""
    from moescope.errors import UsageError

    if mass is not None and mass not in ("counts", "gate"):
        raise UsageError(f"--mass {mass!r} is not 'counts' or 'gate'")
    if phase is not None and phase not in ("prefill", "decode"):
        raise UsageError(f"--phase {phase!r} is not 'prefill' or 'decode'")
    return ImportOptions(
        n_experts=n_experts,
        top_k=top_k,
        moe_layers=None if moe_layers is None else tuple(parse_ranges(moe_layers, "--moe-layers")),
        phys_to_log=phys_to_log,
        model=model,
        mass=mass,  # type: ignore[arg-type]
        phase=phase,  # type: ignore[arg-type]
    )


# -- output ----------------------------------------------------------------------------------------
def console() -> Console:
    return Console(file=sys.stdout, soft_wrap=False)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def print_json_line(obj: Any) -> None:
    """One compact JSON object on one line (JSON Lines, for output that streams), flushed."""
    sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


def progress() -> Progress:
    """A progress bar on stderr (hidden with --quiet or when stderr is not a terminal)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        disable=STATE.quiet,
        transient=True,
    )


@contextlib.contextmanager
def lazy_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback whose bar appears at its first call (input errors leave no bar)."""
    with contextlib.ExitStack() as stack:
        state: list[Any] = []

        def update(done: int, total: int) -> None:
            if not state:
                bar = stack.enter_context(progress())
                state.extend([bar, bar.add_task(description, total=total)])
            state[0].update(state[1], completed=done, total=total)

        yield update
