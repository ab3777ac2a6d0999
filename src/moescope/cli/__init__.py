"""The `moescope` command line: a thin layer over the library.

Results go to stdout (tables, or JSON with ``--json``); diagnostics go to stderr through `logging`.
Exit codes: 0 ok; 2 bad usage or bad input, or a failure the disk, permissions or memory caused (one line
naming the value, what was expected and the fix); 1 a check failed (``plan --verify``) or a bug in moescope
(one line saying so). ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import logging
import math
import sys
import traceback
from typing import Annotated, Any

import click
import typer
import typer.main

from moescope import __version__
from moescope.cli import _common
from moescope.cli.analyze_cmds import concentration, rank
from moescope.cli.cache_cmds import cache
from moescope.cli.capture_cmds import capture_app
from moescope.cli.coact_cmd import coact
from moescope.cli.compare_cmd import compare
from moescope.cli.demo import demo
from moescope.cli.gguf_cmds import gguf_app, plan_app, reduce, split
from moescope.cli.locality_cmd import locality
from moescope.cli.place_cmd import place
from moescope.cli.report_cmd import report
from moescope.cli.scale_cmd import analyze
from moescope.cli.simulate_cmd import simulate
from moescope.cli.trace_cmds import import_, trace_app
from moescope.errors import MoescopeError

app = typer.Typer(
    name="moescope",
    help=(
        "Measure how a Mixture-of-Experts model routes tokens to experts on your workload, and turn the "
        "measurement into deployment decisions.\n\n"
        "Start with `moescope demo`, or `moescope trace info TRACE` on a trace you have "
        "(zarr store, .npz, ESFT logs, SGLang / vLLM dumps, counts JSON)."
    ),
    rich_markup_mode="markdown",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(trace_app, name="trace")
app.add_typer(capture_app, name="capture")
app.add_typer(gguf_app, name="gguf")
app.add_typer(plan_app, name="plan")
app.command("demo")(demo)
app.command("import")(import_)
app.command("concentration")(concentration)
app.command("rank")(rank)
app.command("coact")(coact)
app.command("compare")(compare)
app.command("locality")(locality)
app.command("place")(place)
app.command("cache")(cache)
app.command("simulate")(simulate)
app.command("split")(split)
app.command("reduce")(reduce)
app.command("report")(report)
app.command("analyze")(analyze)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moescope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and full tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only results and errors; no progress bars.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _common.STATE.verbose = verbose
    _common.STATE.quiet = quiet
    logging.basicConfig(
        level=logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO),
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")  # the root callback's flags, taking no value


def hoist_global_flags(argv: list[str]) -> list[str]:
    """`argv` with the global flags moved before the command, so ``moescope cache run.zarr -q`` works as
    ``moescope -q cache run.zarr`` (click reads a group's options only before its subcommand). Nothing after
    a ``--`` is moved; no subcommand takes an option of these names."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in GLOBAL_FLAGS]
    return flags + [a for a in argv[:end] if a not in GLOBAL_FLAGS] + argv[end:]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `moescope` console script: the one exception boundary.

    A `MoescopeError` (bad input or usage) and the failures bad input or the machine can cause anywhere below
    (`expected_failure`: I/O and permissions, undecodable or corrupt data, overflow, nesting, memory) print
    one line and exit 2; anything else is a bug in moescope: one line saying so, exit 1. ``-v`` adds the
    traceback to either.
    """
    argv = hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        command()(args=argv, prog_name="moescope")
    except KeyboardInterrupt:
        print("error: interrupted; outputs not finished were removed", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if _common.STATE.verbose:
            traceback.print_exc()
        line = expected_failure(exc)
        if line is not None:
            print(f"error: {line}", file=sys.stderr)
            sys.exit(2)
        print(
            f"error: internal error ({type(exc).__name__}: {_one_line(exc)}); this is a bug in moescope: rerun "
            "with -v for the traceback and report it",
            file=sys.stderr,
        )
        sys.exit(1)


class FiniteFloat(click.ParamType):
    """A float option that refuses inf and nan (``--vram 1e999``, ``--pcie-gbps nan``), keeping the option's
    own type (and range, for `click.FloatRange`) for everything else."""

    name = "float"

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        out = self.inner.convert(value, param, ctx)
        if isinstance(out, float) and not math.isfinite(out):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return out

    def get_metavar(self, *args: Any, **kwargs: Any) -> str | None:
        return self.inner.get_metavar(*args, **kwargs)


def command() -> click.Command:
    """The click command of `app`, every float option made finite-only (`FiniteFloat`)."""
    cmd = typer.main.get_command(app)
    stack = [cmd]
    while stack:
        c = stack.pop()
        for param in c.params:
            if isinstance(param.type, click.types.FloatParamType):
                param.type = FiniteFloat(param.type)
        stack.extend(getattr(c, "commands", {}).values())
    return cmd


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def expected_failure(exc: BaseException) -> str | None:
    """The one-line message for a failure bad input or the machine can cause, or None for a bug."""
    import json
    import zipfile
    import zlib

    if isinstance(exc, MoescopeError):
        return _one_line(exc)
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or _one_line(exc)!s}; check the path's permissions or pick another"
    if isinstance(exc, FileNotFoundError):
        return f"no such file or folder: {exc.filename or _one_line(exc)!s}; check the path"
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return f"{exc.filename or ''}: {exc.strerror or _one_line(exc)}; check that the path is a file / a folder"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        why = exc.strerror or _one_line(exc)
        return f"{where}{why} (OS error {exc.errno}); check the disk, the path and its permissions"
    if isinstance(exc, zipfile.BadZipFile | zlib.error | EOFError | UnicodeDecodeError | json.JSONDecodeError):
        what = f"{type(exc).__name__}: {_one_line(exc)}"
        return f"an input is corrupt or truncated ({what}); re-create or re-download it"
    if isinstance(exc, RecursionError):
        return "an input is nested too deeply to read (RecursionError); it is not a file moescope writes or reads"
    if isinstance(exc, OverflowError):
        return f"a value is too large ({_one_line(exc)}); check the numbers given and the input's declared sizes"
    if isinstance(exc, MemoryError):
        return (
            "out of memory; read fewer layers (--layers) or tokens (trace slice), or use `moescope analyze` (chunked)"
        )
    return None
