"""The `moescope` command line: a thin layer over the library.

Results go to stdout (tables, or JSON with ``--json``); diagnostics go to stderr through `logging`.
Exit codes: 0 ok, 1 a check failed, 2 bad usage or bad input (one line naming the value, what was
expected and the fix; the traceback only with ``--verbose``).
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Annotated

import typer

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
    """Entry point of the `moescope` console script."""
    argv = hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=argv, prog_name="moescope")
    except MoescopeError as exc:
        if _common.STATE.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
