"""`moescope simulate`: what tokens/s each way of placing experts gives on a stated machine (thin CLI over
`moescope.cache.timeline`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from moescope.cache.timeline import DEFAULT_MACHINE, MACHINES, PREDICTORS, machine_preset, slot_bytes
from moescope.cli import _common as c

_MACHINE_HELP = "; ".join(
    f"{m.name}: GPU {m.gpu_gbps:g}, CPU {m.cpu_gbps:g}, PCIe {m.pcie_gbps:g} GB/s, {m.pcie_latency_us:g} us"
    for m in MACHINES.values()
)


@c.with_inputs
def simulate(
    src: Annotated[Path, typer.Argument(help="A per-token trace (zarr store, .npz, ESFT logs, engine dumps).")],
    gguf: Annotated[
        Path | None, typer.Option("--gguf", help="Model GGUF: expert and dense bytes per layer are read from it.")
    ] = None,
    expert_bytes: c.ExpertBytesOpt = None,
    dense_bytes: c.DenseBytesOpt = None,
    vram: Annotated[
        str | None,
        typer.Option("--vram", help="VRAM for routed experts, comma-separated, e.g. 4GiB,8GiB (default: a sweep)."),
    ] = None,
    slots: Annotated[str | None, typer.Option("--slots", help="Expert slots instead of --vram, e.g. 512,1024.")] = None,
    machine: Annotated[str, typer.Option("--machine", help=f"Preset: {_MACHINE_HELP}.")] = DEFAULT_MACHINE,
    gpu_gbps: Annotated[float | None, typer.Option("--gpu-gbps", help="GPU memory bandwidth, GB/s.")] = None,
    cpu_gbps: Annotated[float | None, typer.Option("--cpu-gbps", help="CPU memory bandwidth, GB/s.")] = None,
    pcie_gbps: Annotated[float | None, typer.Option("--pcie-gbps", help="Host-to-GPU bandwidth, GB/s.")] = None,
    latency_us: Annotated[
        float | None, typer.Option("--latency-us", help="PCIe latency per expert transfer, microseconds.")
    ] = None,
    policy: Annotated[
        str | None, typer.Option("--policy", help="Cache policies, comma-separated (default: as moescope cache).")
    ] = None,
    predictor: Annotated[
        str,
        typer.Option(
            "--predictor",
            help="Prefetch predictors, comma-separated: lookahead (needs capture hf --lookahead), cross-layer, "
            "transition (id-only, learned on first halves), oracle (the true experts: a reference).",
        ),
    ] = ",".join(PREDICTORS),
    distance: Annotated[int, typer.Option("--distance", min=1, help="MoE layers ahead prefetches are issued.")] = 1,
    no_overlap: Annotated[
        bool, typer.Option("--no-overlap", help="Transfers do not overlap compute (the closed-form cost model).")
    ] = False,
    ubatch: Annotated[
        int, typer.Option("--ubatch", min=1, help="Prefill micro-batch in tokens (llama.cpp -ub).")
    ] = 512,
    split: Annotated[
        str, typer.Option("--split", help="'test': learn on first halves, simulate second halves; 'all': in-sample.")
    ] = "test",
    layers: Annotated[str | None, typer.Option("--layers", help="Model layer ids to keep, e.g. 1-4,12.")] = None,
    inputs: c.Inputs = c.Inputs(),
    as_json: c.JsonOpt = False,
) -> None:
    """Should I build a per-expert GPU cache, or keep llama.cpp's static `--n-cpu-moe` offload, and what
    tokens/s does each give on this model, workload and machine?

    Decodes the trace token by token and layer by layer on a stated machine: the dense part of each layer
    on the GPU, each routed expert where the strategy keeps it (GPU, CPU, or loaded over one FIFO PCIe link
    with a per-transfer latency), transfers overlapping compute, stalls counted. Strategies: `cpu-moe` and
    `static-layers` (llama.cpp `--cpu-moe` / `--n-cpu-moe`), `static-experts` (each layer's most frequent
    experts pinned, the rest on the CPU), `cache:<policy>` (a per-layer cache loading on demand, each
    registered policy), `prefetch:<predictor>` (LRU plus prefetches `--distance` layers ahead from the
    captured lookahead or an id-only predictor), and the references `cache:belady`, `prefetch:oracle` and
    `bound` (Belady's transfers fully hidden). Learned pieces fit on the first half of every sequence; the
    second halves are decoded. Every assumption is printed; prefill in `--ubatch` batches is estimated too.

    Example: `moescope simulate run.zarr --gguf model.gguf --vram 4GiB,8GiB,16GiB --machine consumer-pcie5`
    """
    from moescope._units import format_bytes, parse_bytes
    from moescope.cache.timeline import ASSUMPTIONS, default_slots, prefill_estimate, simulate_timeline
    from moescope.errors import UsageError
    from moescope.slicing import parse_ranges, split_halves

    if vram is not None and slots is not None:
        raise UsageError("give --vram or --slots, not both")
    if split not in ("test", "all"):
        raise UsageError(f"--split {split!r} is not 'test' or 'all'")
    m = _machine(machine, gpu_gbps, cpu_gbps, pcie_gbps, latency_us)
    predictors = c.names(predictor) or []
    bad = [p for p in predictors if p not in PREDICTORS]
    if bad:
        raise UsageError(f"--predictor {', '.join(bad)}: unknown; choose from {', '.join(PREDICTORS)}")
    from moescope.cache.policies import check_policies

    check_policies(c.names(policy))  # before any work
    trace = inputs.read_trace(src, "the decode timeline", layers)
    if distance >= max(trace.n_layers, 2):
        raise UsageError(
            f"--distance {distance}: prefetches go that many MoE layers ahead, and {src} has {trace.n_layers}; "
            f"give 1..{max(trace.n_layers - 1, 1)}"
        )
    eb, dense = c.expert_sizes(trace, expert_bytes, gguf, dense_bytes)
    if eb is None:
        raise UsageError(
            "the timeline needs expert sizes: give --gguf model.gguf, or --expert-bytes (and --dense-bytes), "
            "e.g. --expert-bytes 5MiB --dense-bytes 600MB"
        )
    if vram is not None:
        budgets = [int(parse_bytes(v, "--vram") // slot_bytes(eb)) for v in vram.split(",") if v.strip()]
    elif slots is not None:
        budgets = parse_ranges(slots, "--slots")
    else:
        budgets = default_slots(trace.n_layers, trace.n_experts, trace.top_k)
    if not budgets:
        raise UsageError("--vram / --slots names no budget; give e.g. --vram 4GiB,8GiB")
    depth = trace.extras["lookahead"].shape[2] if "lookahead" in trace.extras else 0
    if "lookahead" in predictors and depth < distance:
        if predictor != ",".join(PREDICTORS):  # asked for by name
            raise UsageError(
                f"--predictor lookahead at --distance {distance} needs a trace captured with --lookahead "
                f"{distance} or more (moescope capture hf ... --lookahead {distance}); {src} has "
                f"{depth or 'none'}: drop it, lower --distance or recapture"
            )
        predictors.remove("lookahead")  # the default list: only the predictors this trace supports
    if split == "test":
        train, test = split_halves(trace)
        if train.n_tokens == 0 or test.n_tokens == 0:
            raise UsageError(
                f"{src}'s sequences are too short to split into halves ({trace.n_tokens} tokens in "
                f"{trace.n_sequences} sequences); use --split all to simulate it in-sample"
            )
    else:
        train = test = trace
    runs = []
    with c.lazy_progress("simulating budgets") as bar:
        for i, b in enumerate(sorted(set(budgets))):
            bar(i, len(set(budgets)))
            runs.append(
                simulate_timeline(
                    test,
                    expert_bytes=eb,
                    dense_bytes=dense,
                    slots=b,
                    machine=m,
                    policies=c.names(policy),
                    predictors=predictors,
                    distance=distance,
                    overlap=not no_overlap,
                    train=train,
                )
            )
        bar(len(runs), len(runs))
    from moescope.cache.timeline import Costs

    main = runs[len(runs) // 2]
    prefill = prefill_estimate(test, Costs.of(eb, dense, m), main.gpu_layers, main.capacity, ubatch)
    out: dict[str, Any] = {
        "machine": m.to_dict(),
        "expert_bytes": eb.tolist(),
        "dense_bytes": dense,
        "tokens": test.n_tokens,
        "split": split,
        "assumptions": list(ASSUMPTIONS),
        "budgets": [{**r.to_dict(), "vram_bytes": int(r.slots * slot_bytes(eb))} for r in runs],
        "prefill": {"slots": main.slots, "rows": [p.to_dict() for p in prefill]},
    }
    if as_json:
        c.print_json(out)
        return
    _print(out, runs, main, prefill, test, eb, format_bytes)


def _machine(name: str, gpu: float | None, cpu: float | None, pcie: float | None, lat: float | None) -> Any:
    """The preset with the figures given by flag replaced (checked by `Machine`)."""
    import dataclasses

    given = {
        k: v
        for k, v in {"gpu_gbps": gpu, "cpu_gbps": cpu, "pcie_gbps": pcie, "pcie_latency_us": lat}.items()
        if v is not None
    }
    base = machine_preset(name)
    return dataclasses.replace(base, name=base.name + (" (edited)" if given else ""), **given)


def _print(out: dict[str, Any], runs: list[Any], main: Any, prefill: list[Any], test: Any, eb, format_bytes) -> None:
    con = c.console()
    m = main.machine
    con.print(
        c.styled("decode timeline", "bold"),
        f": {test.n_tokens:,} tokens x {test.n_layers} MoE layers, top-{test.top_k} of "
        f"{test.n_experts}; machine {m.name}: GPU {m.gpu_gbps:g} GB/s, CPU {m.cpu_gbps:g} GB/s, PCIe "
        f"{m.pcie_gbps:g} GB/s + {m.pcie_latency_us:g} us per transfer; expert {format_bytes(float(np.mean(eb)))}, "
        f"dense {format_bytes(out['dense_bytes'])} per token; "
        + ("learned on first halves, simulated on second halves" if out["split"] == "test" else "IN-SAMPLE"),
        sep="",
    )
    vram = slot_bytes(eb) * main.slots
    t = Table(
        title=f"strategies at {format_bytes(vram)} of VRAM for experts ({main.slots} slots: {main.capacity} per "
        f"layer for caches, {main.gpu_layers} whole layers for static-layers)",
        title_justify="left",
    )
    for col in ("strategy", "tok/s", "stall", "PCIe/tok", "hits", "pf/tok", "wasted"):
        t.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=col == "strategy")
    notes: dict[str, int] = {}
    for r in main.results:
        if r.note:
            notes.setdefault(r.note, len(notes) + 1)
        mark = (" (ref)" if r.family == "reference" else "") + (f" [{notes[r.note]}]" if r.note else "")
        t.add_row(
            r.name + mark,
            f"{r.tokens_per_second:.2f}",
            f"{r.stall_share:.0%}",
            format_bytes(r.pcie_bytes / max(r.tokens, 1)),
            "" if r.hit_rate is None else f"{r.hit_rate:.1%}",
            f"{r.prefetch_loads / r.tokens:.2f}" if r.prefetch_loads else "",
            f"{r.wasted_prefetches / r.prefetch_loads:.0%}" if r.prefetch_loads else "",
        )
    con.print(t)
    for note, n in notes.items():
        con.print(f"  [{n}] {note}")
    con.print(
        "  stall: share of the time waiting for PCIe; hits: accesses served from VRAM; pf/tok: prefetch loads per "
        "token; wasted: prefetched experts never used (evicted, or still unused at the end); (ref): knows the "
        "future, a reference"
    )
    con.print(f"Verdict at {format_bytes(vram)}: {main.verdict()}.")
    if len(runs) > 1:
        sweep = Table(title="tokens/s vs VRAM for routed experts", title_justify="left")
        sweep.add_column("strategy", no_wrap=True)
        for r in runs:
            sweep.add_column(format_bytes(slot_bytes(eb) * r.slots), justify="right")
        names = list(dict.fromkeys(x.name for r in runs for x in r.results))
        for name in names:
            cells = []
            for r in runs:
                hit = next((x for x in r.results if x.name == name), None)
                cells.append("-" if hit is None else f"{hit.tokens_per_second:.2f}")
            sweep.add_row(name, *cells)
        con.print(sweep)
        wins = [format_bytes(slot_bytes(eb) * r.slots) for r in runs if r.cache_wins()]
        con.print(
            "A per-expert cache beats every static placement at: "
            + (", ".join(wins) if wins else "no budget tried")
            + "."
        )
    pt = Table(
        title=f"prefill in micro-batches of {prefill[0].ubatch} tokens ({main.slots} slots; weights' movement and "
        "reads only: compute-bound phases not modelled, so tokens/s is an upper bound)",
        title_justify="left",
    )
    for col in ("strategy", "PCIe/tok", "CPU reads/tok", "tok/s at most"):
        pt.add_column(col, justify="left" if col == "strategy" else "right")
    for p in prefill:
        pt.add_row(p.name, format_bytes(p.pcie_bytes_per_token), format_bytes(p.cpu_bytes_per_token),
                   f"{p.tokens_per_second:,.0f}")  # fmt: skip
    con.print(pt)
    for p in prefill:
        con.print(f"  {p.name}: {p.note}")
    for line in out["assumptions"]:
        con.print(f"  assumes: {line}")
