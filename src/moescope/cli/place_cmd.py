"""`moescope place`: static expert placement across devices (thin CLI over `moescope.place`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moescope.cli import _common as c
from moescope.place.methods import CV_MARGIN, MAX_MEAN_MARGIN, METHODS

_METHOD_HELP = (
    "Methods, comma-separated (default: "
    + ", ".join(n for n, m in METHODS.items() if m.default)
    + "): "
    + ", ".join(METHODS)
    + "."
)


@c.with_inputs
def place(
    src: Annotated[Path, typer.Argument(help="A per-token trace (zarr store, .npz, ESFT logs, engine dumps).")],
    devices: Annotated[str, typer.Option("--devices", "-d", help="Device counts to place on, e.g. 2,4,8.")] = "2,4,8",
    method: Annotated[str | None, typer.Option("--method", "-m", help=_METHOD_HELP)] = None,
    replicas: Annotated[
        int,
        typer.Option("--replicas", min=0, help="Extra expert copies per layer (hottest first); rows with and without."),
    ] = 0,
    split: Annotated[
        str, typer.Option("--split", help="'test': fit on first halves, score on second halves; 'all': in-sample.")
    ] = "test",
    fit_labels: c.FitLabelsOpt = None,
    score_labels: c.ScoreLabelsOpt = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of random placement, local search, Mt-KaHyPar.")] = 0,
    cv_margin: Annotated[
        float,
        typer.Option(
            "--cv-margin", help="Refined methods' constraint: scored load CV at most frequency's + this (e.g. 0.05)."
        ),
    ] = CV_MARGIN,
    max_mean_margin: Annotated[
        float,
        typer.Option(
            "--max-mean-margin", help="Refined methods' constraint: scored max/mean load at most frequency's + this."
        ),
    ] = MAX_MEAN_MARGIN,
    balance_margin: Annotated[
        str,
        typer.Option(
            "--balance-margin",
            help="Refined methods: the train load-CV margin over frequency's; 'auto': chosen per D, with the "
            "drift cap, by validation inside the fitting data.",
        ),
    ] = "auto",
    drift_margin: Annotated[
        str,
        typer.Option(
            "--drift-margin",
            help="Refined methods, with a numeric --balance-margin: drift CV allowed above frequency's, as a "
            "ratio, or 'off' (with 'auto' the validation chooses it).",
        ),
    ] = "auto",
    balance_loads: Annotated[
        Path | None,
        typer.Option(
            "--balance-loads",
            help="Balance these expert loads instead of the fitted tokens': counts of the workload to be served "
            "(llama.cpp imatrix, counts JSON, or any trace); co-activation still comes from SRC.",
        ),
    ] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="Model layer ids to keep, e.g. 1-4,12.")] = None,
    export: Annotated[
        Path | None,
        typer.Option("--export", help="Write one placement as JSON (layer -> device -> experts + EPLB arrays)."),
    ] = None,
    export_eplb: Annotated[
        Path | None,
        typer.Option("--export-eplb", help="Write {physical_to_logical_map} as SGLang's --init-expert-location reads."),
    ] = None,
    devices_for_export: Annotated[
        int | None, typer.Option("--devices-for-export", min=1, help="D of the exported placement (default: largest).")
    ] = None,
    method_for_export: Annotated[
        str | None,
        typer.Option("--method-for-export", help="Method of the exported placement (default: coact-refined if run)."),
    ] = None,
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="Per-layer figures (a table at the largest D; in --json, every row).")
    ] = False,
    scheduler: c.SchedulerOpt = None,
    overwrite: c.OverwriteOpt = False,
    inputs: c.Inputs = c.Inputs(),
    as_json: c.JsonOpt = False,
) -> None:
    """Which device should hold which expert? Static expert-parallel placements compared on held-out tokens.

    With a fixed expert -> device map, each token's hidden state goes to every distinct device holding
    one of its k experts (all-to-all traffic), while the most loaded device sets the pace. Every method
    is fitted on the first half of each sequence and scored on the second halves (`--split test`), or
    with `--fit-labels A,B --score-labels C` fitted on some workloads' whole sequences and scored on
    another's (how a placement holds on a workload it has not seen), next to standard load balancing
    (`frequency`, always run, fitted on the same data). Per D and method: mean distinct devices
    per token and its change vs frequency; load CV across devices (selections served; mean over
    layers); max/mean load; experts per device (slots used, `ceil(E/D)` + `ceil(R/D)` at most).

    The refined methods aim at a stated constraint on the scored tokens: load CV within frequency's
    + `--cv-margin` and max/mean load within frequency's + `--max-mean-margin`. Scored loads drift
    from train loads, so the train caps that keep it are chosen per D by validation inside the
    fitting data (`--balance-margin auto`): the fitting data is split again the way the real fit is
    scored (each train part's first half against its second half; with labels, each fitted label
    left out once), coact-refined is fitted for a grid of train margins with and without a drift cap
    (how much loads of co-placed experts drift together within a sequence), and the candidate with
    the fewest validated devices/token whose validated excesses, plus their standard errors, stay
    within the margins is used; the choice is printed. A numeric `--balance-margin` (with
    `--drift-margin`) sets the train caps by hand.

    Expert loads carry over poorly from one workload to another, while which experts a token picks
    together carries over well: a placement fitted on other workloads keeps its locality on a new
    one but may lose its balance. `--balance-loads FILE` balances the expert counts of the workload
    to be served (a llama.cpp imatrix of it, a counts JSON, or a short trace of it), matched by
    model layer id, with co-activation still learned from SRC; every method, frequency too, then
    balances those loads, and the train caps are the stated margins against them.

    With `--replicas R` each method also gets R
    copies of its hottest experts; a token uses the fewest devices holding its experts, ties to the
    least loaded.

    Methods:

    {methods}

    `--scheduler local:N` (or a Dask scheduler address) fits groups of layers as Dask tasks; every
    method treats layers independently, so the results are the same.

    `--export` writes one placement (`--devices-for-export`, `--method-for-export`, with the replicas
    if asked) as JSON; `--export-eplb` writes its physical-to-logical map for SGLang.

    Example: `moescope place run.zarr --devices 4,8 --method frequency,coact-refined --export placement.json`
    """
    from moescope._atomic import FILE, check_output
    from moescope.errors import UsageError
    from moescope.place import compare_placements, write_eplb_map, write_placement
    from moescope.slicing import parse_ranges

    devs = parse_ranges(devices, "--devices")
    names = _methods(method)
    params = _params(cv_margin, max_mean_margin, balance_margin, drift_margin)
    for out in (export, export_eplb):
        if out is not None:
            check_output(out, overwrite, kind=FILE, inputs=(src, inputs.phys_to_log, balance_loads))
    d_exp, m_exp = 0, ""
    if (export or export_eplb) is not None:
        d_exp = devices_for_export or max(devs)
        if d_exp not in devs:
            raise UsageError(f"--devices-for-export {d_exp} is not among --devices {devs}; add it there")
        m_exp = _export_method(method_for_export, names)
    trace = inputs.read_trace(src, "the placement planner", layers)
    given = None if balance_loads is None else _balance_loads(balance_loads, trace)
    with c.lazy_progress("placing") as bar:
        report = compare_placements(
            trace,
            devs,
            names,
            replicas=replicas,
            split=split,
            seed=seed,
            params=params,
            scheduler=scheduler,
            progress=bar,
            fit_labels=c.names(fit_labels),
            score_labels=c.names(score_labels),
            balance_loads=given,
        )
    if (export or export_eplb) is not None:
        chosen = report.placements[(d_exp, m_exp, replicas)]
        if export is not None:
            write_placement(chosen, export, overwrite, model=trace.meta.model)
            typer.echo(f"wrote {export} ({m_exp}, {d_exp} devices, {replicas} replicas)", err=True)
        if export_eplb is not None:
            write_eplb_map(chosen, export_eplb, overwrite)
            typer.echo(f"wrote {export_eplb}", err=True)
    if as_json:
        c.print_json(report.to_dict(layers=per_layer))
        return
    _print(report, src, balance_loads)
    if per_layer:
        _print_layers(report)


place.__doc__ = (place.__doc__ or "").replace(
    "{methods}", "\n    ".join(f"- `{name}`: {cls.summary}" for name, cls in METHODS.items())
)


def _balance_loads(path: Path, trace):
    """The expert loads in `path` (counts of any readable kind; a trace is counted) for the trace's layers."""
    from moescope.errors import FormatError
    from moescope.imports import as_counts, detect_format
    from moescope.imports.registry import READERS
    from moescope.place.data import balance_table

    try:
        fmt = detect_format(path)
    except FormatError as exc:  # its own fix names --from, which here would apply to SRC
        if path.exists():
            raise FormatError(
                f"--balance-loads {str(path)!r}: cannot tell its format; give a file of one of these kinds: "
                f"{', '.join(sorted(READERS))} (--from applies to SRC only)"
            ) from None
        raise FormatError(f"--balance-loads: {exc}") from None
    counts = as_counts(c.Inputs(fmt=fmt).read(path))  # detected once, here
    return balance_table(counts, trace.layer_ids, trace.n_experts, str(path))


def _params(cv_margin: float, max_mean_margin: float, balance_margin: str, drift_margin: str):
    """PlaceParams from the balance flags: 'auto' balance and drift margins are left to the validation."""
    from moescope.errors import UsageError
    from moescope.place import PlaceParams

    bal = None if balance_margin.strip().lower() == "auto" else _float(balance_margin, "--balance-margin", "'auto'")
    text = drift_margin.strip().lower()
    if bal is None and text != "auto":
        raise UsageError(
            f"--drift-margin {drift_margin}: with --balance-margin auto the validation chooses the drift cap too; "
            "give a numeric --balance-margin (e.g. 0.02) to set both by hand"
        )
    drift = None if text in ("auto", "off", "none") else _float(drift_margin, "--drift-margin", "'off'")
    return PlaceParams(cv_margin=cv_margin, max_mean_margin=max_mean_margin, balance_margin=bal, drift_margin=drift)


def _float(text: str, flag: str, word: str) -> float:
    from moescope.errors import UsageError

    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a number like 0.05, or {word}") from None
    if value != value:
        raise UsageError(f"{flag} {text!r}: expected a number like 0.05, or {word}")
    return value


def _methods(text: str | None) -> list[str]:
    """The asked methods (None: every method whose optional dependency is installed)."""
    from moescope.place.methods import default_methods

    return default_methods() if text is None else c.names(text)


def _export_method(asked: str | None, run: list[str]) -> str:
    from moescope.errors import UsageError

    if asked is not None:
        if asked not in run and asked != "frequency":
            raise UsageError(f"--method-for-export {asked!r} is not among the methods run ({', '.join(run)})")
        return asked
    if "coact-refined" in run:
        return "coact-refined"
    others = [n for n in run if n != "frequency"]
    if len(others) > 1:
        raise UsageError(f"several methods run ({', '.join(others)}): pick one with --method-for-export")
    return others[0] if others else "frequency"


def _print(report, src: Path, balance_loads: Path | None = None) -> None:
    con = c.console()
    if report.split == "labels":
        split = f"fitted on {'+'.join(report.fit_labels)} sequences, scored on {'+'.join(report.score_labels)}"
    elif report.split == "test":
        split = "fitted on first halves, scored on second halves"
    else:
        split = "IN-SAMPLE (--split all)"
    table = Table(
        title=(
            f"expert placement: {report.n_experts} experts x {len(report.layer_ids)} layers, top-{report.top_k}; "
            f"{split}; {report.test_tokens:,} scored tokens - {report.model or src.name}"
        ),
        title_justify="left",
        min_width=60,
    )
    with_r = any(r.replicas for r in report.rows)
    cols = ["D", "method", *(["R"] if with_r else []), "devices/token", "vs frequency", "load CV", "max/mean"]
    for col in (*cols, "experts/device", "fit s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    last = None
    for r in report.rows:
        if last is not None and r.n_devices != last:
            table.add_section()
        last = r.n_devices
        s = r.score
        table.add_row(
            str(r.n_devices),
            r.method,
            *([str(r.replicas)] if with_r else []),
            f"{s.mean_devices:.3f}",
            f"{r.vs_frequency * 100:+.1f}%",
            f"{s.mean_cv:.3f}",
            f"{s.mean_max_mean:.3f}",
            str(int(s.experts_per_device.max())),
            f"{r.fit_seconds:.1f}",
        )
    con.print(table)
    if balance_loads is not None:
        con.print(
            f"Every method balances the expert loads of {balance_loads} (co-activation from {src.name}); the refined "
            f"methods' train caps are the stated margins against them.",
            highlight=False,
        )
    for line in _calibration_lines(report):
        con.print(line, highlight=False)
    line = _agreement_line(report)
    if line:
        con.print(line, highlight=False)
    con.print(_reading(report), highlight=False)


def _print_layers(report) -> None:
    """Per MoE layer at the largest D: each replica-free method's devices/token, load CV, max/mean load and the
    most experts one device holds."""
    d = max(r.n_devices for r in report.rows)
    rows = [r for r in report.rows if r.n_devices == d and r.replicas == 0]
    table = Table(
        title=f"per layer at D={d}: devices/token / load CV / max/mean load (scored tokens) / experts on the "
        "fullest device",
        title_justify="left",
    )
    table.add_column("layer", justify="right")
    for r in rows:
        table.add_column(r.method, justify="right")
    for i, lid in enumerate(report.layer_ids.tolist()):
        cells = [
            f"{r.score.devices_per_token[i]:.2f} / {r.score.cv[i]:.3f} / {r.score.max_mean[i]:.2f} / "
            f"{int(r.score.experts_per_device[i].max())}"
            for r in rows
        ]
        table.add_row(str(lid), *cells)
    c.console().print(table)


def _reading(report) -> str:
    """One line: the best replica-free non-baseline row at the largest D within the stated constraint (load CV
    within frequency's + cv_margin, max/mean within frequency's + max_mean_margin), against frequency; when
    none beats frequency, the row with the fewest devices per token and the balance it broke (under the labels
    protocol without given loads, with the pointer to --balance-loads)."""
    d = max(r.n_devices for r in report.rows)
    base = report.row(d, "frequency")
    cvm, mmm = report.params.cv_margin, report.params.max_mean_margin
    at_d = [r for r in report.rows if r.n_devices == d and r.replicas == 0]
    best = min((r for r in at_d if r.within(report.params)), key=lambda r: r.score.mean_devices)
    if best.method == "frequency":
        head = (
            f"Read: at D={d} no method beats frequency's {base.score.mean_devices:.2f} devices/token with load CV "
            f"within {cvm:g} of its {base.score.mean_cv:.3f} and max/mean within {mmm:g} of its "
            f"{base.score.mean_max_mean:.3f}"
        )
        others = (r for r in at_d if r.method != "frequency")
        local = min(others, key=lambda r: r.score.mean_devices, default=None)
        if local is None or local.vs_frequency >= 0:
            return head + "; placement by co-activation does not pay here."
        why = (
            f"; {local.method} cuts devices/token by {-local.vs_frequency * 100:.1f}% but at load CV "
            f"{local.score.mean_cv:.3f} and max/mean {local.score.mean_max_mean:.3f}"
        )
        if report.split == "labels" and not report.given_loads:
            return (
                f"{head}{why}: the locality carried to {'+'.join(report.score_labels)}, the balance fitted on "
                f"{'+'.join(report.fit_labels)} did not. Give the served workload's expert counts (an imatrix, a "
                "counts file or a short trace of it) with --balance-loads to balance those instead."
            )
        return f"{head}{why}: it does not hold the balance here."
    return (
        f"Read: at D={d}, {best.method} sends each token to {best.score.mean_devices:.2f} devices "
        f"({best.vs_frequency * 100:+.1f}% vs frequency's {base.score.mean_devices:.2f}) at load CV "
        f"{best.score.mean_cv:.3f} (frequency {base.score.mean_cv:.3f}), on {_scored(report)}."
    )


def _agreement_line(report) -> str:
    """How far the workloads' expert loads agree (`moescope.place.compare.load_agreement`), in one line; empty
    with fewer than two labelled workloads, or when the placement balanced given loads."""
    if not report.load_agreement or report.given_loads:
        return ""

    def fmt(x) -> str:
        r = "n/a (constant loads)" if x.correlation is None else f"{x.correlation:.2f}"
        return f"{x.a} vs {x.b} {r}"

    pairs = list(report.load_agreement)
    head = [fmt(pairs.pop(0))] if report.split == "labels" else []  # fitted against scored comes first
    if len(pairs) > 3:
        vals = sorted(x.correlation for x in pairs if x.correlation is not None)
        rest = (
            f"{len(pairs)} fitted labels each against the rest: median {vals[len(vals) // 2]:.2f}, range "
            f"{vals[0]:.2f} to {vals[-1]:.2f}"
            if vals
            else f"{len(pairs)} fitted labels: n/a (constant loads)"
        )
        shown = "; ".join([*head, rest])
    else:
        shown = "; ".join([*head, *(fmt(x) for x in pairs)])
    return (
        f"Expert-load agreement between workloads (correlation of per-expert selections, mean over layers): {shown}. "
        "A placement stays balanced on another workload only as far as its expert loads agree with the fitted ones."
    )


def _scored(report) -> str:
    return {"labels": "the unseen workload's tokens", "test": "held-out tokens"}.get(report.split, "the fitted tokens")


def _calibration_lines(report) -> list[str]:
    """How the refined methods' train caps were chosen, per D (empty when set by hand or not run)."""
    cals = list(report.calibrations.values())
    if not cals or not cals[0].trials:
        return []
    p = report.params
    out = [
        f"Refined methods' train caps, chosen for load CV <= frequency's + {p.cv_margin:g} and max/mean <= "
        f"frequency's + {p.max_mean_margin:g} by validation inside the fitting data ({cals[0].inner}; "
        f"{len(cals[0].layer_ids)} layer{'s' if len(cals[0].layer_ids) != 1 else ''}; "
        f"{sum(c.seconds for c in cals):.1f} s):"
    ]
    for cal in cals:
        t = cal.chosen
        drift = "off" if cal.drift_margin is None else f"{cal.drift_margin:g}"
        verdict = "" if cal.met else "; no candidate held the margins in validation: the closest one"
        out.append(
            f"  D={cal.n_devices}: train CV margin {cal.balance_margin:+.3f}, drift cap {drift} (validated: load CV "
            f"{t.cv_excess:+.3f} +/- {t.cv_se:.3f}, max/mean {t.max_mean_excess:+.3f}, devices/token "
            f"{t.vs_frequency * 100:+.1f}%{verdict})"
        )
    return out
