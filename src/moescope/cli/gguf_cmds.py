"""`moescope gguf inspect`, `moescope split`, `moescope reduce`: act on GGUF model files (over `moescope.gguf`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from moescope.cli import _common as c
from moescope.corpus import read_corpus
from moescope.errors import UsageError
from moescope.gguf import inspect_gguf

CorpusOpt = Annotated[
    Path | None, typer.Option("--corpus", help="Text to score on: a .txt, a .jsonl (text field) or a folder.")
]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per scored window.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=2, help="Tokens scored in all.")]

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
    if m.mtp_blocks:
        con.print(
            f"MTP / NextN block(s) {list(m.mtp_blocks)}: {format_bytes(m.mtp_bytes)}, stored but not loaded by "
            f"llama.cpp in normal decoding, so not routed layers here (and not counted in VRAM plans)"
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
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder to write, whole, holding the group GGUFs and split.json (new, empty, or with --overwrite "
            "an earlier split output).",
        ),
    ],
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
    evaluate: Annotated[
        bool, typer.Option("--evaluate", help="Score every group against the full model on --corpus (llama.cpp).")
    ] = False,
    corpus: CorpusOpt = None,
    trace: Annotated[
        Path | None, typer.Option("--trace", help="With --evaluate: a trace to predict each group's routing mass.")
    ] = None,
    seq_len: SeqLenOpt = 512,
    max_tokens: MaxTokensOpt = 4096,
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
    Writes the folder `--out` holding `<model>.group-<g>-of-<G>.gguf` and `split.json` (new expert id ->
    source id), built beside it and renamed into place in one step: it appears complete or not at all, and
    `--overwrite` replaces an earlier split output whole (never another folder, nor one holding the model).
    `--evaluate --corpus FILE` then scores each group against the full model (perplexity, KL, top-1
    agreement, as `moescope reduce`), beside the routing mass the group keeps on `--trace`.

    Example: `moescope rank run.zarr -o ranking.csv`, then
    `moescope split model.gguf -o parts/ -g 2 --mode ranked --ranking ranking.csv --core 4`
    """
    from moescope.analyze import read_ranking_csv
    from moescope.gguf.split import check_out_dir, plan_groups, split_gguf

    check_out_dir(out_dir, overwrite, (model, ranking, groups_file, corpus, trace))
    m = inspect_gguf(model)
    if evaluate and corpus is None:
        raise UsageError("--evaluate needs --corpus FILE (text to score the groups on)")
    docs = read_corpus(corpus) if evaluate else None
    rk = None if ranking is None else read_ranking_csv(ranking)
    plan = plan_groups(m, groups, mode, ranking=rk, custom=groups_file, core=core)
    mass = None
    if evaluate and trace is not None:
        from moescope.analyze import group_mass
        from moescope.imports import as_trace, read_input

        tr = as_trace(read_input(trace), "--trace")
        mass = [group_mass(tr, g) for g in plan]
    with c.lazy_progress("writing") as bar:
        result = split_gguf(model, out_dir, plan, overwrite=overwrite, progress=bar)
    out: dict[str, Any] = result.to_dict()
    if evaluate:
        from moescope.gguf.evaluate import Variant
        from moescope.gguf.evaluate import evaluate as score

        variants = [Variant(f"{i + 1} of {len(result.paths)}", p) for i, p in enumerate(result.paths)]
        with c.lazy_progress("scoring") as bar:
            scores = score(Variant("full", model), variants, docs, seq_len=seq_len, max_tokens=max_tokens, progress=bar)
        out["evaluation"] = [
            {
                **sc.to_dict(),
                **(
                    {}
                    if mass is None
                    else {
                        "routing_mass_kept": float(np.mean(mass[i].mass_share)),
                        "tokens_fully_inside": float(np.mean(mass[i].full_token_share)),
                    }
                ),
            }
            for i, sc in enumerate(scores)
        ]
    if as_json:
        c.print_json(out)
        return
    for p in result.paths:
        typer.echo(f"wrote {p}")
    typer.echo(f"wrote {result.manifest}")
    if evaluate:
        table = Table(title="groups vs the full model (same text)", title_justify="left")
        cols = ["group", "perplexity", "KL vs full", "top-1 agree", "tok/s"]
        if mass is not None:
            cols += ["routing mass kept", "tokens fully inside"]
        for col in cols:
            table.add_column(col, justify="left" if col == "group" else "right")
        for row in out["evaluation"]:
            cells = [
                row["label"],
                f"{row['perplexity']:.2f}",
                f"{row['kl_vs_reference']:.3f}",
                f"{row['top1_agreement']:.1%}",
                f"{row['prefill_tokens_per_s']:.0f}",
            ]
            if mass is not None:
                cells += [f"{row['routing_mass_kept']:.1%}", f"{row['tokens_fully_inside']:.1%}"]
            table.add_row(*cells)
        c.console().print(table)


def reduce(
    model: ModelArg,
    corpus: CorpusOpt = None,
    ks: Annotated[str | None, typer.Option("--k", help="Experts per token to try, e.g. 8,6,4 (default: k..1).")] = None,
    tolerance: Annotated[
        float, typer.Option("--tolerance", min=0.0, help="Accepted perplexity increase over the model's own k.")
    ] = 0.02,
    seq_len: SeqLenOpt = 512,
    max_tokens: MaxTokensOpt = 4096,
    as_json: c.JsonOpt = False,
) -> None:
    """How far can top-k be reduced? Runs the model at each k (llama.cpp metadata override of
    `<arch>.expert_used_count`) on the same text and reports perplexity, KL divergence of the next-token
    distributions from the model's own k, top-1 agreement and prefill tokens/s; recommends the smallest k
    within `--tolerance` of the native perplexity and prints the llama.cpp flag that sets it.

    Example: `moescope reduce Qwen3-30B-A3B-Q4_K_M.gguf --corpus my-prompts.jsonl --k 8,6,4`
    """
    from gguf import Keys

    from moescope.gguf.evaluate import Variant, evaluate, recommend_k
    from moescope.slicing import parse_ranges

    m = inspect_gguf(model)
    if corpus is None:
        raise UsageError("--corpus FILE is required: the text on which to compare the k values")
    docs = read_corpus(corpus)
    k_list = list(range(m.top_k, 0, -1)) if ks is None else sorted(set(parse_ranges(ks, "--k")), reverse=True)
    bad = [k for k in k_list if not 1 <= k <= m.n_experts]
    if bad:
        raise UsageError(f"--k {bad}: each k must be in 1..{m.n_experts} (the model's experts per layer)")
    if m.top_k not in k_list:
        k_list = [m.top_k, *k_list]
    key = Keys.LLM.EXPERT_USED_COUNT.format(arch=m.architecture)
    variants = [Variant(f"k={k}", model, () if k == m.top_k else ((key, "int", k),)) for k in k_list]
    with c.lazy_progress("scoring") as bar:
        scores = evaluate(
            variants[k_list.index(m.top_k)], variants, docs, seq_len=seq_len, max_tokens=max_tokens, progress=bar
        )
    best = recommend_k(scores, k_list, m.top_k, tolerance)
    flag = f"--override-kv {key}=int:{best}"
    above = [k for k in k_list if k > m.top_k]
    notes = (
        [
            f"k = {', '.join(map(str, above))} is above the model's own top-k {m.top_k}: more experts per token than "
            f"it was trained with, scored for comparison and never recommended"
        ]
        if above
        else []
    )
    if as_json:
        c.print_json(
            {
                "native_k": m.top_k,
                "tolerance": tolerance,
                "recommended_k": best,
                "llama_cpp_flag": flag,
                "notes": notes,
                "scores": [dict(k=k, **s.to_dict()) for k, s in zip(k_list, scores, strict=True)],
            }
        )
        return
    table = Table(
        title=f"top-k reduction on {scores[0].tokens:,} scored tokens (native k = {m.top_k})", title_justify="left"
    )
    for col in ("k", "perplexity", "vs native", "KL vs native", "top-1 agree", "prefill tok/s"):
        table.add_column(col, justify="right")
    base = scores[k_list.index(m.top_k)].perplexity
    for k, sc in zip(k_list, scores, strict=True):
        table.add_row(
            str(k),
            f"{sc.perplexity:.3f}",
            f"{sc.perplexity / base - 1:+.1%}",
            f"{sc.kl_vs_reference:.4f}",
            f"{sc.top1_agreement:.1%}",
            f"{sc.prefill_tokens_per_s:.0f}",
        )
    con = c.console()
    con.print(table)
    con.print(f"recommended k = {best} (perplexity within {tolerance:.0%} of k = {m.top_k}): {flag}")
    for note in notes:
        con.print(f"note: {note}")


plan_app = typer.Typer(
    help="Plans for running a MoE model: which experts go where, as engine flags.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


@plan_app.command("offload")
def offload(
    model: Annotated[
        Path | None,
        typer.Argument(help="A GGUF model file (read through a memory map, never modified); not with --from."),
    ] = None,
    vram: Annotated[
        str | None,
        typer.Option("--vram", help="GPU memory to use, one budget per GPU in device order: 10GiB or 24GiB,12GiB."),
    ] = None,
    ctx: Annotated[int, typer.Option("--ctx", min=1, help="Context length (KV cache size).")] = 4096,
    kv_type: Annotated[str, typer.Option("--kv-type", help="KV cache type: f16, q8_0, q4_0, f32, ...")] = "f16",
    compute_buffer: Annotated[
        str | None,
        typer.Option("--compute-buffer", help="Compute buffer allowance per GPU (default 512MiB + logits)."),
    ] = None,
    ubatch: Annotated[int, typer.Option("--ubatch", min=1, help="llama.cpp -ub (prefill batch).")] = 512,
    flavor: Annotated[
        str,
        typer.Option(
            "--flavor",
            help="Engine whose flags to print: llama.cpp (--n-cpu-moe N: blocks 0..N-1 on CPU) or ik_llama.cpp "
            "(-ncmoe N: the last N expert blocks on CPU, one GPU).",
        ),
    ] = "llama.cpp",
    device_prefix: Annotated[
        str,
        typer.Option(
            "--device-prefix",
            help="Device buffer names without the number: CUDA, ROCm, MUSA, Vulkan, SYCL, MTL (Metal), CANN.",
        ),
    ] = "CUDA",
    fit_target: Annotated[
        str,
        typer.Option(
            "--fit-target",
            help="Free memory per GPU that llama.cpp's --fit keeps, for the baseline row: MiB as llama.cpp's "
            "--fit-target takes it (1024), or a size (1GiB).",
        ),
    ] = "1024",
    trace: Annotated[
        Path | None,
        typer.Option("--trace", help="A trace of this model: expert use per ubatch and a cache projection."),
    ] = None,
    pcie_gbps: Annotated[float, typer.Option("--pcie-gbps", help="Host-to-GPU bandwidth, GB/s.")] = 25.0,
    gpu_gbps: Annotated[float, typer.Option("--gpu-gbps", help="GPU memory bandwidth, GB/s.")] = 900.0,
    cpu_gbps: Annotated[float, typer.Option("--cpu-gbps", help="CPU memory bandwidth, GB/s.")] = 60.0,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Apply the printed forms through llama.cpp's own tensor-override hook (llama-cpp-python, "
            "metadata only; GPU buffer names emulated on a CPU build) and check each puts exactly the planned "
            "tensors on each named buffer; exit 1 if not.",
        ),
    ] = False,
    from_plan: Annotated[
        Path | None,
        typer.Option("--from", help="A plan file written by --json: print its flags and accounting again."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the versioned plan file (JSON) other tools can consume.")
    ] = False,
) -> None:
    """Which MoE layers' experts fit in VRAM on one or several GPUs, as engine flags, and what speed to expect.

    Accounts, per GPU, for its blocks' non-expert weights and KV cache at `--ctx` / `--kv-type`, a
    compute-buffer allowance and (last GPU) the output head, then keeps as many whole layers' experts in
    VRAM as fit; the rest stay on the CPU. One GPU: prints `-ngl 999 --n-cpu-moe N` and the equivalent
    `-ot` rule. Several GPUs (`--vram 24GiB,12GiB`): adds `-ts` (layers per GPU) and `-ot` rules naming
    each GPU's buffer (CUDA0, CUDA1, ...). `--flavor ik_llama.cpp` follows ik's `-ncmoe` (the last N
    expert blocks). When layers differ in bytes (mixed quant types), each GPU keeps the set of layers with
    the most expert bytes (then, with `--trace`, the layers whose ubatches use the most experts: what
    prefill streams), printed as `-ot` when `--n-cpu-moe` cannot express it. Beside it, what llama.cpp's
    automatic `--fit` would choose under its rule (the last layers' experts to the CPU, 1 GiB kept free
    per GPU), with both projections: decode tokens/s (CPU-resident experts run on the CPU) and the PCIe
    bound on prefill; with `--trace`, also a per-expert cache in the same VRAM (one GPU).

    Examples: `moescope plan offload Qwen3-30B-A3B-Q4_K_M.gguf --vram 10GiB --ctx 32768 --kv-type q8_0`;
    `moescope plan offload model.gguf --vram 24GiB,12GiB --json > plan.json`; `moescope plan offload --from plan.json`
    """
    from moescope._units import format_bytes, parse_bytes
    from moescope.gguf import planfile

    if from_plan is not None:
        if model is not None or vram is not None or verify or trace is not None:
            raise UsageError("--from prints a saved plan again: give no MODEL, --vram, --trace or --verify with it")
        _print_plan(planfile.read_plan(from_plan), as_json)
        return
    if model is None or vram is None:
        raise UsageError("give a MODEL and --vram (e.g. --vram 24GiB,12GiB), or --from plan.json")
    from moescope.cache import Hardware
    from moescope.gguf.fit import fit_baseline
    from moescope.gguf.offload import plan_devices
    from moescope.gguf.plan import experts_per_window_by_layer, project_plan

    hw = Hardware(pcie_gbps, gpu_gbps, cpu_gbps)
    budgets = [parse_bytes(v, "--vram") for v in vram.split(",")]
    m = inspect_gguf(model)
    tr = None
    if trace is not None:
        from moescope.imports import as_trace, read_input

        tr = as_trace(read_input(trace), "--trace")
        m.expert_bytes_at(tr.layer_ids, tr.n_experts, "--trace")  # refused here unless the trace is of this model
    compute = None if compute_buffer is None else parse_bytes(compute_buffer, "--compute-buffer")
    # llama.cpp's --fit-target is a number of MiB (0 allowed); a size with a unit is taken as written
    bare = fit_target.strip()
    margin = (
        int(float(bare) * 2**20)
        if bare.replace(".", "", 1).isdigit() and float(bare) <= 2**40
        else parse_bytes(fit_target, "--fit-target")
    )
    kw = {"ctx": ctx, "kv_type": kv_type, "compute": compute, "ubatch": ubatch}
    used = None if tr is None else experts_per_window_by_layer(tr, ubatch)
    p = plan_devices(m, budgets, flavor=flavor, prefix=device_prefix, prefill_use=used, **kw)
    proj = project_plan(p, m, top_k=m.top_k, hw=hw, experts_per_ubatch=used, ubatch=ubatch)
    fit = fit_baseline(m, budgets, prefix=device_prefix, margin=margin, **kw)
    baseline: dict[str, Any] = {"margin": margin}
    if fit is None:
        baseline["reason"] = (
            f"does not fit even with every expert on the CPU and {format_bytes(margin)} kept free per GPU"
        )
    else:
        baseline["plan"] = fit.to_dict(m)
        baseline["projection"] = project_plan(fit, m, top_k=m.top_k, hw=hw, experts_per_ubatch=used, ubatch=ubatch)
    assumptions = {
        "ctx": ctx,
        "kv_type": kv_type,
        "ubatch": ubatch,
        "compute_buffer": compute,
        "hardware": {"pcie_gbps": pcie_gbps, "gpu_gbps": gpu_gbps, "cpu_gbps": cpu_gbps},
        "accounting": planfile.ACCOUNTING,
    }
    cache = _cache_same_vram(tr, m, p, hw) if tr is not None and len(budgets) == 1 else None
    verified = None
    if verify:
        from moescope.gguf.verify import verify_devices

        verified = verify_devices(m, p)
    doc = planfile.plan_document(
        m, p, assumptions=assumptions, projection=proj, baseline=baseline, cache=cache, verified=verified
    )
    _print_plan(doc, as_json)
    if verify and not verified["ok"]:
        raise typer.Exit(1)


def _print_plan(doc: dict[str, Any], as_json: bool) -> None:
    """A plan file as JSON, or as the lines `moescope.gguf.planfile.render` gives."""
    from moescope.gguf import planfile

    if as_json:
        c.print_json(doc)
        return
    con = c.console()
    for line in planfile.render(doc):
        con.print(line, soft_wrap=True)


def _cache_same_vram(tr: Any, m: Any, p: Any, hw: Any) -> dict[str, Any]:
    """Decode tokens/s of a per-expert cache holding as many experts as the plan's expert VRAM."""
    from moescope.cache import budget_projection, miss_curves

    eb = np.array(m.expert_bytes_at(tr.layer_ids, tr.n_experts, "--trace"), dtype=np.float64)
    free = p.devices[0].budget - p.devices[0].weights - p.devices[0].kv_cache - p.devices[0].compute
    slots = int(max(free, 0) // eb.max())
    if slots < tr.top_k * tr.n_layers:
        return {"slots": 0, "reason": f"{slots} expert slots < top-k x layers = {tr.top_k * tr.n_layers}"}
    alloc, proj = budget_projection(
        miss_curves(tr, ["lru"]),
        slots,
        "lru",
        expert_bytes=eb,
        dense_bytes=m.dense_bytes_per_token,
        top_k=tr.top_k,
        n_experts=tr.n_experts,
        hw=hw,
    )
    cache = next(x for x in proj if x.name == "expert-cache")
    return {
        "slots": slots,
        "capacities": list(alloc.capacities),
        "miss_rate": alloc.misses / max(alloc.accesses, 1),
        "tokens_per_second": cache.tokens_per_second,
    }
