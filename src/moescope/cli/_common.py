"""Shared CLI pieces: global state, the input options every reading command takes, output helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

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
# the sizes that price transfers (`expert_sizes`), for cache, simulate and report
ExpertBytesOpt = Annotated[
    str | None, typer.Option("--expert-bytes", help="Bytes of one routed expert, e.g. 5MiB (instead of --gguf's).")
]
DenseBytesOpt = Annotated[
    str | None, typer.Option("--dense-bytes", help="Non-expert bytes read per token (default: --gguf's, or 0).")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")]
FitLabelsOpt = Annotated[
    str | None,
    typer.Option(
        "--fit-labels",
        help="Fit on the whole sequences with these labels (default with --score-labels: every other label), "
        "e.g. intent,law.",
    ),
]
ScoreLabelsOpt = Annotated[
    str | None,
    typer.Option(
        "--score-labels",
        help="Score on the whole sequences with these labels (default with --fit-labels: every other label): "
        "a workload the fit has not seen.",
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="Run on Dask (extra [dask]): 'local:N' (a LocalCluster of N workers) or a scheduler address.",
    ),
]


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The input options every command that reads routing data takes (`with_inputs` declares them on the
    command), read the same way everywhere."""

    fmt: str | None = None
    n_experts: int | None = None
    top_k: int | None = None
    moe_layers: str | None = None
    phys_to_log: Path | None = None
    phase: str | None = None

    def options(self, *, model: str | None = None, mass: str | None = None) -> ImportOptions:
        """`ImportOptions` from these flags (enumerations validated), with a command's own --model / --mass."""
        from moescope.errors import UsageError

        if mass is not None and mass not in ("counts", "gate"):
            raise UsageError(f"--mass {mass!r} is not 'counts' or 'gate'")
        if self.phase is not None and self.phase not in ("prefill", "decode"):
            raise UsageError(f"--phase {self.phase!r} is not 'prefill' or 'decode'")
        return ImportOptions(
            n_experts=self.n_experts,
            top_k=self.top_k,
            moe_layers=None if self.moe_layers is None else tuple(parse_ranges(self.moe_layers, "--moe-layers")),
            phys_to_log=self.phys_to_log,
            model=model,
            mass=mass,  # type: ignore[arg-type]
            phase=self.phase,  # type: ignore[arg-type]
        )

    def read(self, src: Path, *, model: str | None = None, mass: str | None = None) -> Any:
        """`src` read with these flags: a trace or counts. `--mass` goes to counts readers (which column of the
        file); a per-token source is read whole and counted with it afterwards (`imports.as_counts`)."""
        from moescope.imports import detect_format, read_input

        self.options(mass=mass)  # the flags are checked whatever the source
        name = self.fmt or detect_format(src)
        reader = READERS.get(name)
        counts_source = reader is not None and reader.produces == "counts"
        return read_input(src, name, self.options(model=model, mass=mass if counts_source else None))

    def store(self, src: Path) -> Any:
        """`src` opened as a `TraceStore` when it is a moescope trace store read with no other input option
        (None otherwise: the caller reads it whole with `read_trace`, which also reports misused options), for
        commands that read a long trace in parts instead of loading it."""
        from moescope import _atomic
        from moescope.store import TraceStore, is_store

        others = any(getattr(self, f.name) is not None for f in dataclasses.fields(self) if f.name != "fmt")
        if self.fmt not in (None, "zarr") or others or "://" in str(src):
            return None
        _atomic.recover(src)  # as read_input does: a writer killed mid-replace gets its old version back
        return TraceStore(src) if src.is_dir() and is_store(src) else None

    def read_trace(self, src: Path, purpose: str, layers: str | None = None) -> Any:
        """The per-token trace a command analyses: refused with `purpose` in the message when `src` holds only
        counts, then cut to ``--layers`` (model layer ids) when given."""
        from moescope.imports import as_trace
        from moescope.slicing import select_layers

        trace = as_trace(self.read(src), purpose)
        return trace if layers is None else select_layers(trace, parse_ranges(layers, "--layers"))


_INPUT_PARAMS = (
    ("fmt", FromOpt),
    ("n_experts", NExpertsOpt),
    ("top_k", TopKOpt),
    ("moe_layers", MoeLayersOpt),
    ("phys_to_log", PhysToLogOpt),
    ("phase", PhaseOpt),
)
_LAST_PARAMS = ("overwrite", "as_json")  # the input options go before these in --help


def with_inputs(command: Callable[..., Any]) -> Callable[..., Any]:
    """Declare the input options (--from, --n-experts, --top-k, --moe-layers, --phys-to-log, --phase) on a
    command whose keyword parameter ``inputs`` receives them as one `Inputs`: typer reads the wrapper's
    signature, so each command lists them once, here."""
    sig = inspect.signature(command, eval_str=True)
    own = [q for q in sig.parameters.values() if q.name != "inputs"]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=a) for n, a in _INPUT_PARAMS]
    cut = next((i for i, q in enumerate(own) if q.name in _LAST_PARAMS), len(own))
    own = [q.replace(kind=inspect.Parameter.KEYWORD_ONLY) for q in own]  # typer passes every value by name
    params = own[:cut] + extra + own[cut:]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        inputs = Inputs(**{name: kwargs.pop(name, None) for name, _ in _INPUT_PARAMS})
        return command(*args, inputs=inputs, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {q.name: q.annotation for q in params}
    return wrapper


def names(text: str | None) -> list[str] | None:
    """A comma-separated list of names (``"lru, belady"`` -> ``["lru", "belady"]``, empty items dropped);
    None stays None (the command's default)."""
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def expert_sizes(
    trace: Any, expert_bytes: str | None, gguf: Path | None, dense_bytes: str | None
) -> tuple[np.ndarray | None, float]:
    """Per-layer expert bytes ([layers], or None when neither --expert-bytes nor --gguf is given) and dense bytes
    per token (--dense-bytes, else the GGUF's, else 0), for the commands that price transfers."""
    from moescope._units import parse_bytes
    from moescope.errors import UsageError

    if expert_bytes is not None and gguf is not None:
        raise UsageError("give --expert-bytes or --gguf, not both")

    dense = 0.0 if dense_bytes is None else float(parse_bytes(dense_bytes, "--dense-bytes"))
    if expert_bytes is not None:
        return np.full(trace.n_layers, float(parse_bytes(expert_bytes, "--expert-bytes"))), dense
    if gguf is None:
        return None, dense
    from moescope.gguf import inspect_gguf

    model = inspect_gguf(gguf)
    eb = np.array(model.expert_bytes_at(trace.layer_ids, trace.n_experts), dtype=np.float64)
    return eb, dense if dense_bytes is not None else float(model.dense_bytes_per_token)


# -- output ----------------------------------------------------------------------------------------
def console() -> Console:
    """stdout, markup off: names from inputs (labels, model names, paths) may hold ``[...]``, which rich would
    parse as markup (and fail on ``[/]``); styled text is built as `rich.text.Text` (`styled`) instead."""
    return Console(file=sys.stdout, soft_wrap=False, markup=False)


def styled(text: str, style: str) -> Text:
    """`text` printed in `style` (e.g. "green", "bold") by a markup-free console."""
    return Text(text, style=style)


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
