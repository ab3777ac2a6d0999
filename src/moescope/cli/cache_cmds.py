"""`moescope cache`: replay a trace through expert caches (thin CLI over `moescope.cache`)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from moescope.cache.policies import DEFAULT_POLICIES, POLICIES, check_policies
from moescope.cli import _common as c

_POLICY_HELP = (
    "Policies, comma-separated, or 'all' (every one but learned-near, which needs a trace with candidates, and "
    "gate-lrfu, which needs gate weights). "
    + "Default, chosen by cost: "
    + ", ".join(DEFAULT_POLICIES)
    + ". Choices: "
    + ", ".join(POLICIES)
    + "."
)


@c.with_inputs
def cache(
    src: Annotated[Path, typer.Argument(help="A per-token trace (zarr store, .npz, ESFT logs, engine dumps).")],
    capacity: Annotated[
        str | None,
        typer.Option(
            "--capacity",
            help="Experts per layer in fast memory, e.g. 8,16,32 (default: about E/8, E/4, E/2, between k and E).",
        ),
    ] = None,
    policy: Annotated[str | None, typer.Option("--policy", help=_POLICY_HELP)] = None,
    pooled: Annotated[
        bool, typer.Option("--pooled", help="One cache over all layers holding capacity x layers experts.")
    ] = False,
    reset_per_sequence: Annotated[
        bool, typer.Option("--reset-per-sequence", help="Empty the cache at every sequence (default: one for all).")
    ] = False,
    split: Annotated[
        str, typer.Option("--split", help="'test': fit on first halves, replay second halves; 'all': in-sample.")
    ] = "test",
    fit_labels: c.FitLabelsOpt = None,
    score_labels: c.ScoreLabelsOpt = None,
    aging: Annotated[int, typer.Option("--aging", min=0, help="LFU halves its counts every N tokens (0: never).")] = 0,
    prefetch: Annotated[
        int, typer.Option("--prefetch", min=0, help="Experts coact-prefetch loads per token (capped at capacity - k).")
    ] = 1,
    layers: Annotated[str | None, typer.Option("--layers", help="Model layer ids to keep, e.g. 1-4,12.")] = None,
    curve: Annotated[
        bool, typer.Option("--curve", help="Miss-rate curves over every capacity k..E (LRU in one pass).")
    ] = False,
    slots: Annotated[
        int | None, typer.Option("--slots", min=1, help="Total expert slots to allocate across layers.")
    ] = None,
    vram: Annotated[
        str | None, typer.Option("--vram", help="VRAM for routed experts, e.g. 10GiB (slots = VRAM / expert bytes).")
    ] = None,
    budget_policy: Annotated[
        str, typer.Option("--budget-policy", help="Policy whose curves drive the allocation.")
    ] = "lru",
    expert_bytes: c.ExpertBytesOpt = None,
    gguf: Annotated[
        Path | None, typer.Option("--gguf", help="Model GGUF: expert and dense bytes are read from it.")
    ] = None,
    dense_bytes: c.DenseBytesOpt = None,
    scheduler: c.SchedulerOpt = None,
    pcie_gbps: Annotated[float, typer.Option("--pcie-gbps", help="Host-to-GPU bandwidth, GB/s.")] = 25.0,
    gpu_gbps: Annotated[float, typer.Option("--gpu-gbps", help="GPU memory bandwidth, GB/s.")] = 900.0,
    cpu_gbps: Annotated[float, typer.Option("--cpu-gbps", help="CPU memory bandwidth, GB/s.")] = 60.0,
    inputs: c.Inputs = c.Inputs(),
    as_json: c.JsonOpt = False,
) -> None:
    """If C experts per layer sit in fast memory, how often does a token wait for slow memory, under which
    policy, and what does that do to decode speed?

    Replays the trace through each cache policy at each capacity. Semantics: one cache per MoE layer (or
    `--pooled`); a token's k experts are needed together and are never evicted for each other; misses are
    loads the token waits for, prefetch loads are issued ahead; Belady (offline optimum) is the floor.
    Policies that learn are fitted on the first half of every sequence and all are scored on the second
    halves (`--split test`). A trace store is read a group of layers at a time, so memory grows with one
    layer's ids, not the whole trace. `--curve` adds miss-rate curves over every capacity; `--slots` / `--vram`
    chooses per-layer capacities for a budget (exact, from the curves) and, with `--expert-bytes` or
    `--gguf`, projects decode tokens/s for all-experts-on-CPU, whole layers in VRAM, and the cache.

    Policies:

    {policies}

    Example: `moescope cache run.zarr --capacity 8,16,32 --policy lru,lfu-static,belady`
    `--vram 10GiB --gguf model.gguf`
    """
    from moescope._units import parse_bytes
    from moescope.cache import (
        ASSUMPTIONS,
        Hardware,
        PolicyParams,
        budget_projection,
        default_capacities,
        miss_curves,
        simulate,
    )
    from moescope.cache.simulate import reads_trace
    from moescope.cache.streamed import LayerColumns, miss_curves_store, simulate_store
    from moescope.errors import UsageError
    from moescope.slicing import parse_ranges

    hw = Hardware(pcie_gbps, gpu_gbps, cpu_gbps)
    names = check_policies(c.names(policy))
    check_policies([budget_policy], "--budget-policy")
    if slots is not None and vram is not None:
        raise UsageError("give --slots or --vram, not both")
    # a store is read in layer groups (memory: one group's ids), anything else whole; a store's groups hold
    # expert ids only, so a policy that reads the router's near misses or the gate weights needs the whole trace
    store = None if reads_trace(names) else inputs.store(src)
    layer_list = None if layers is None else parse_ranges(layers, "--layers")
    if store is not None:
        trace = store.read(0, 0, layers=layer_list).trace  # no tokens: the shape, layers and ids to check flags
    else:
        trace = inputs.read_trace(src, "the cache simulator", layers)
    eb, dense = c.expert_sizes(trace, expert_bytes, gguf, dense_bytes)
    caps = (
        default_capacities(trace.top_k, trace.n_experts) if capacity is None else parse_ranges(capacity, "--capacity")
    )
    params = PolicyParams(aging=aging, prefetch=prefetch)
    budget = slots
    if vram is not None:
        if eb is None:
            raise UsageError("--vram needs the expert size: give --expert-bytes or --gguf (or use --slots)")
        budget = int(parse_bytes(vram, "--vram") // float(np.max(eb)))
    if budget is not None and budget < trace.top_k * trace.n_layers:
        raise UsageError(
            f"a budget of {budget} expert slots is below {trace.top_k * trace.n_layers} = top-k ({trace.top_k}) x "
            f"{trace.n_layers} layers, the least a per-expert cache needs; raise the budget or pick --layers"
        )
    curves = None
    wants_curves = curve or budget is not None
    protocol = dict(
        reset_per_sequence=reset_per_sequence,
        split=split,
        params=params,
        fit_labels=c.names(fit_labels),
        score_labels=c.names(score_labels),
    )
    with contextlib.ExitStack() as stack:
        source, run, curves_of = trace, simulate, miss_curves
        if store is not None:
            ids = store.layer_ids if layer_list is None else layer_list
            cols = None  # the table and the curves read one decode of the store's layers
            if wants_curves and LayerColumns.room(store, len(ids)):
                cols = stack.enter_context(LayerColumns(store, ids))
            source = store
            run = functools.partial(simulate_store, layers=layer_list, columns=cols)
            curves_of = functools.partial(miss_curves_store, layers=layer_list, columns=cols)
        with c.lazy_progress("replaying") as bar:
            result = run(source, caps, names, pooled=pooled, progress=bar, scheduler=scheduler, **protocol)
        if wants_curves:
            curve_names = list(
                dict.fromkeys(([*names] if curve else []) + ([budget_policy] if budget is not None else []))
            )
            with c.lazy_progress("curves") as bar:
                curves = curves_of(source, curve_names, progress=bar, **protocol)
    mean_eb = None if eb is None else float(np.mean(eb))
    out: dict[str, Any] = {"table": result.to_dict(mean_eb)}
    if curve and curves is not None:
        out["curves"] = curves.to_dict()
    if budget is not None and curves is not None:
        shape = dict(top_k=trace.top_k, n_experts=trace.n_experts, hw=hw)
        sizes = np.ones(trace.n_layers) if eb is None else eb  # without sizes: the allocation only
        alloc, proj = budget_projection(curves, budget, budget_policy, expert_bytes=sizes, dense_bytes=dense, **shape)
        out["allocation"] = alloc.to_dict()
        if eb is not None:
            out["projection"] = {
                "hardware": {"pcie_gbps": pcie_gbps, "gpu_gbps": gpu_gbps, "cpu_gbps": cpu_gbps},
                "expert_bytes": eb.tolist(),
                "dense_bytes": dense,
                "assumptions": list(ASSUMPTIONS),
                "placements": [p.to_dict() for p in proj],
            }
    if as_json:
        c.print_json(out)
        return
    _print(result, out, curves, mean_eb)


cache.__doc__ = (cache.__doc__ or "").replace(
    "{policies}", "\n    ".join(f"- `{name}`: {cls.summary}" for name, cls in POLICIES.items())
)


def _print(result, out: dict[str, Any], curves, mean_eb: float | None) -> None:
    from moescope._units import format_bytes

    con = c.console()
    where = "one pooled cache" if result.pooled else "one cache per layer"
    life = "reset per sequence" if result.reset_per_sequence else "shared across sequences"
    split = {
        "test": "fitted on first halves, scored on second halves",
        "labels": f"fitted on {'+'.join(result.fit_labels)} sequences, scored on {'+'.join(result.score_labels)}",
    }.get(result.split, "IN-SAMPLE (--split all)")
    table = Table(
        title=f"expert caches: {where}, {life}; {split}; {result.tokens:,} tokens x {len(result.layer_ids)} layers",
        min_width=60,
        title_justify="left",
    )
    # loads per token; gap closed: share of LRU's gap to Belady; vs LRU: transfers over LRU's
    # the prefetch column only when a prefetcher ran (it is 0 for every other policy)
    prefetch = any(POLICIES[name].prefetches for name in result.policies)
    cols = ["cap", "policy", "miss", "vs Belady", "gap closed", *(["pf/tok"] * prefetch), "xfer", "vs LRU"]
    if mean_eb is not None:
        cols.append("bytes/tok")
    for col in cols:
        if col == "policy":  # names whole, with a footnote mark
            table.add_column(col, no_wrap=True, min_width=max(map(len, result.policies)) + 2)
        else:
            table.add_column(col, justify="right")
    last_cap = None
    notes: dict[str, int] = {}  # why a row sits below the Belady floor -> its footnote mark (*, **)
    for row in out["table"]["rows"]:
        if last_cap is not None and row["capacity"] != last_cap:
            table.add_section()
        last_cap = row["capacity"]
        gap = row["gap_to_belady"]
        why = row["below_floor_because"]
        if why is not None:
            notes.setdefault(why, len(notes) + 1)
        cells = [
            str(row["capacity"]),
            row["policy"] + ("" if why is None else "*" * notes[why]),
            f"{row['demand_miss_rate']:.1%}",
            "" if gap is None else f"{gap * 100:+.1f}",
            "" if row["lru_gap_closed"] is None else f"{row['lru_gap_closed']:.0%}",
            *([f"{row['prefetch_loads_per_token']:.2f}"] * prefetch),
            f"{row['transfers_per_token']:.2f}",
            "" if row["transfers_vs_lru"] is None else f"{row['transfers_vs_lru']:.2f}x",
        ]
        if mean_eb is not None:
            cells.append(format_bytes(row["bytes_per_token"]))
        table.add_row(*cells)
    con.print(table)
    for why, mark in notes.items():
        con.print(f"{'*' * mark} below the Belady floor because it {why}")
    con.print(
        "Read: miss = demand misses (loads a token waits for) / accesses; vs Belady in points of miss rate; "
        "pf/tok (prefetch loads) and xfer (transfers: demand misses + prefetch loads) are loads per token over "
        "all layers; Belady is the offline floor for demand loading; gap closed = share of LRU's miss-rate gap "
        "to Belady a policy closes (LRU 0%, Belady 100%); "
        "vs LRU = transfers over LRU's; a prefetcher trades transfers for misses."
    )
    if curves is not None and "curves" in out:
        ct = Table(
            title="miss-rate curves (demand miss rate by capacity; --json for every capacity)", title_justify="left"
        )
        caps = curves.capacities
        pick = sorted({int(x) for x in np.unique(np.geomspace(caps[0], caps[-1], num=min(8, caps.size)).round())})
        pick = [p for p in pick if p in set(caps.tolist())] or caps.tolist()
        ct.add_column("policy")
        for p in pick:
            ct.add_column(str(p), justify="right")
        rates = out["curves"]["miss_rate"]
        for name in curves.policies:
            ct.add_row(name, *(f"{rates[name][int(np.flatnonzero(caps == p)[0])]:.1%}" for p in pick))
        con.print(ct)
    if "allocation" in out:
        a = out["allocation"]
        con.print(
            f"budget {a['budget_slots']} slots ({a['policy']}): per-layer capacities {a['capacities']} -> miss rate "
            f"{a['miss_rate']:.1%} vs {a['uniform_miss_rate']:.1%} for the uniform split "
            f"({a['uniform_capacities'][0]} per layer): {a['gain_over_uniform']:.1%} fewer demand misses"
        )
    if "projection" in out:
        pt = Table(title="projected decode speed (cost model; assumptions below)", title_justify="left")
        for col in ("placement", "tokens/s", "ms/token", "detail"):
            pt.add_column(col, justify="left" if col in ("placement", "detail") else "right")
        for p in out["projection"]["placements"]:
            pt.add_row(p["name"], f"{p['tokens_per_second']:.1f}", f"{p['seconds_per_token'] * 1e3:.2f}", p["detail"])
        con.print(pt)
        for line in out["projection"]["assumptions"]:
            con.print(f"  assumes: {line}")
