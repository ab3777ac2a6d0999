"""`moescope capture ...`: record real routing by running a model over your corpus."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from moescope.cli import _common as c

capture_app = typer.Typer(
    help="Record real routing by running a MoE model over a corpus (extra [hf]: transformers, [llama]: llama.cpp).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


# -- options shared by every capture engine ------------------------------------------------------------
CorpusArg = Annotated[
    Path | None,
    typer.Argument(
        help='A text file, a .jsonl file ("text", optional "label"), or a folder of them (or --tokens-from).'
    ),
]
TokensFromOpt = Annotated[
    Path | None,
    typer.Option(
        "--tokens-from",
        help="Instead of a corpus, run the token ids a trace recorded, sequence by sequence (give the same "
        "--seq-len), so two engines see the very same ids: then `moescope compare`.",
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output trace store (*.zarr), written as it grows.")]
GenerateOpt = Annotated[
    int, typer.Option("--generate", min=0, help="Decode mode: generate N tokens per document, record only those.")
]
PromptLenOpt = Annotated[
    int | None,
    typer.Option("--prompt-len", min=1, help="Decode mode: prompt tokens per document (default: --seq-len)."),
]
SeqLenOpt = Annotated[
    int, typer.Option("--seq-len", min=1, help="Prefill: documents are cut into sequences of this many tokens.")
]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", min=1, help="Stop after recording this many tokens.")]
# max=3: capture.routers.MAX_LOOKAHEAD (not imported here: the capture package is slow to import at start-up)
LookaheadOpt = Annotated[
    int,
    typer.Option(
        "--lookahead",
        min=0,
        max=3,
        help="Also record what the routers of the next N MoE layers choose from each router's input "
        "(what a prefetcher could predict); 0-3.",
    ),
]
CandidatesOpt = Annotated[
    int,
    typer.Option("--candidates", min=0, help="Also record each router's top-M experts and probabilities (M > top-k)."),
]


@capture_app.command("hf")
def hf(
    model_dir: Annotated[
        Path, typer.Argument(help="Local transformers model folder (config.json, weights, tokenizer).")
    ],
    corpus: CorpusArg = None,
    out: OutOpt = ...,
    tokens_from: TokensFromOpt = None,
    generate: GenerateOpt = 0,
    prompt_len: PromptLenOpt = None,
    seq_len: SeqLenOpt = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prefill: sequences per forward.")] = 8,
    max_tokens: MaxTokensOpt = None,
    device: Annotated[str, typer.Option("--device", help="Torch device: cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="Weights dtype: float32, bfloat16 or float16.")] = "float32",
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Decode mode: keep generating past an end-of-sequence token.")
    ] = False,
    lookahead: LookaheadOpt = 0,
    candidates: CandidatesOpt = 0,
    overwrite: c.OverwriteOpt = False,
    as_json: c.JsonOpt = False,
) -> None:
    """Capture the routing of a Hugging Face transformers MoE model over a corpus.

    A hook on every MoE layer's router records the expert ids and gate weights the model actually used
    (DeepSeek-V3's bias and group routing included). Qwen2/3-MoE, OLMoE, Mixtral, DeepSeek-V2/V3, GPT-OSS,
    Granite-MoE and PhiMoE are known; other transformers MoE models are detected from their router outputs.

    `Prefill` (default): every document is teacher-forced in sequences of at most --seq-len
    tokens. `Decode` (--generate N): each document's first --prompt-len tokens are the prompt,
    then N tokens are generated greedily with a KV cache, one per step; only their routing is recorded.
    In a corpus folder, files in a sub-folder are labelled with its name (law/a.txt -> law), files at the
    top with their stem; a .jsonl "label" field wins. `--lookahead N` also records, at every MoE layer, the
    experts the routers of the next N MoE layers choose from this layer's router input (the signal a
    prefetching cache would use; scored by `moescope locality`); `--candidates M` records each router's
    top-M experts and probabilities.

    The model and corpus are checked before the output is created. The store is committed chunk by
    chunk and at least every 30 s, so a capture that dies leaves what was committed readable (marked
    incomplete), and `moescope analyze OUT --follow` can analyse it while it runs.

    Example: `moescope capture hf ~/models/OLMoE-1B-7B corpus/ -o olmoe.zarr --max-tokens 200000`
    """
    from moescope._atomic import TRACE_STORE, check_output
    from moescope.capture.hf import capture_hf, check_device, torch_dtype

    check_output(out, overwrite, kind=TRACE_STORE, inputs=(model_dir, corpus, tokens_from))
    torch_dtype(dtype)
    check_device(device)
    docs = _inputs(corpus, tokens_from)
    t0 = time.perf_counter()
    with c.lazy_progress("capturing") as progress:
        path = capture_hf(
            model_dir,
            None,
            docs,
            out,
            mode="decode" if generate else "prefill",
            seq_len=seq_len,
            generate=generate,
            prompt_len=prompt_len,
            max_tokens=max_tokens,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            ignore_eos=ignore_eos,
            lookahead=lookahead,
            candidates=candidates,
            corpus=str(corpus) if corpus is not None else f"token ids of {tokens_from}",
            overwrite=overwrite,
            progress=progress,
        )
    seconds = time.perf_counter() - t0
    _report(path, len(docs), seconds, as_json)


@capture_app.command("llama")
def llama(
    model: Annotated[Path, typer.Argument(help="Local GGUF file of a Mixture-of-Experts model.")],
    corpus: CorpusArg = None,
    out: OutOpt = ...,
    tokens_from: TokensFromOpt = None,
    generate: GenerateOpt = 0,
    prompt_len: PromptLenOpt = None,
    seq_len: SeqLenOpt = 512,
    max_tokens: MaxTokensOpt = None,
    override_kv: Annotated[
        list[str] | None,
        typer.Option(
            "--override-kv",
            help="llama.cpp metadata override KEY=TYPE:VALUE (TYPE int, float, bool, str); repeatable.",
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads (default: all).")] = None,
    flash_attn: Annotated[
        str, typer.Option("--flash-attn", help="Flash attention: auto, on or off (off + --kv-type f32: exact).")
    ] = "auto",
    kv_type: Annotated[str, typer.Option("--kv-type", help="KV cache type: f16 (llama.cpp default) or f32.")] = "f16",
    n_gpu_layers: Annotated[
        int, typer.Option("--n-gpu-layers", min=0, help="Layers to offload to the GPU (GPU builds only).")
    ] = 0,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Decode mode: keep generating past an end-of-generation token.")
    ] = False,
    lookahead: LookaheadOpt = 0,
    candidates: CandidatesOpt = 0,
    overwrite: c.OverwriteOpt = False,
    as_json: c.JsonOpt = False,
) -> None:
    """Capture the routing of a GGUF MoE model run by llama.cpp (needs llama-cpp-python) over a corpus.

    The ggml eval callback reads every MoE layer's selected experts (`ffn_moe_topk`) and the gate
    weights it applied, as llama.cpp computed them (quantised weights, its kernels). Documents are
    tokenised with the GGUF's own tokenizer. `--lookahead N` also records, at every MoE layer, the experts
    the routers of the next N MoE layers (read from the GGUF) choose from the hidden state entering this
    layer's router, with llama.cpp's selection rule for the architecture (gating, selection bias, expert
    groups; an architecture moescope has not checked is refused); `--candidates M` records each router's
    top-M experts and probabilities. Both as in `capture hf`, so the two captures can be compared.

    `Prefill` (default): every document is run in sequences of at most --seq-len tokens, each in a
    fresh KV cache. `Decode` (--generate N): the first --prompt-len tokens are the prompt, then N tokens
    are generated greedily, one per step; only their routing is recorded.

    The GGUF and corpus are checked before the output is created; the store is committed chunk by chunk
    and at least every 30 s (`moescope analyze OUT --follow` reads it while it grows).

    Example: `moescope capture llama qwen3-30b-a3b-q4_k_m.gguf corpus/ -o qwen.zarr --max-tokens 200000`
    """
    from moescope._atomic import TRACE_STORE, check_output
    from moescope.capture.llama import capture_llama
    from moescope.errors import UsageError
    from moescope.gguf import inspect_gguf
    from moescope.gguf.runtime import KV_TYPES, parse_override

    check_output(out, overwrite, kind=TRACE_STORE, inputs=(model, corpus, tokens_from))
    fa = {"auto": None, "on": True, "off": False}
    if flash_attn not in fa:
        raise UsageError(f"--flash-attn {flash_attn!r} is not one of auto, on, off")
    if kv_type not in KV_TYPES:
        raise UsageError(f"--kv-type {kv_type!r} is not one of {', '.join(KV_TYPES)}")
    overrides = list(override_kv or [])
    for spec in overrides:
        parse_override(spec)
    inspect_gguf(model)
    docs = _inputs(corpus, tokens_from)
    t0 = time.perf_counter()
    with c.lazy_progress("capturing") as progress:
        path = capture_llama(
            model,
            docs,
            out,
            mode="decode" if generate else "prefill",
            seq_len=seq_len,
            generate=generate,
            prompt_len=prompt_len,
            max_tokens=max_tokens,
            n_threads=threads,
            flash_attn=fa[flash_attn],
            kv_type=kv_type,
            n_gpu_layers=n_gpu_layers,
            overrides=overrides,
            ignore_eos=ignore_eos,
            lookahead=lookahead,
            candidates=candidates,
            corpus=str(corpus) if corpus is not None else f"token ids of {tokens_from}",
            overwrite=overwrite,
            progress=progress,
        )
    seconds = time.perf_counter() - t0
    _report(path, len(docs), seconds, as_json)


def _inputs(corpus: Path | None, tokens_from: Path | None) -> list:
    """The documents of CORPUS, or the token-id lists of each sequence of --tokens-from (exactly one)."""
    from moescope.corpus import read_corpus
    from moescope.errors import UsageError

    if (corpus is None) == (tokens_from is None):
        raise UsageError("give a CORPUS or --tokens-from TRACE (one of them): what to run the model over")
    if corpus is not None:
        return read_corpus(corpus)
    trace = c.Inputs().read_trace(tokens_from, "capture --tokens-from")
    if trace.token_ids is None:
        raise UsageError(
            f"{str(tokens_from)!r} recorded no token ids; give a trace from moescope capture (hf or llama)"
        )
    return [trace.token_ids[s].tolist() for _, s in trace.iter_sequences()]


def _report(path: Path, documents: int, seconds: float, as_json: bool) -> None:
    """Print what a capture wrote (a table, or JSON)."""
    from moescope.store import TraceStore

    store = TraceStore(path)
    result = {
        "path": str(path),
        "tokens": store.n_tokens,
        "sequences": store.n_sequences,
        "layers": store.n_layers,
        "layer_ids": store.layer_ids.tolist(),
        "n_experts": store.n_experts,
        "top_k": store.top_k,
        "phase": store.phase,
        "documents": documents,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(store.n_tokens / seconds, 1) if seconds > 0 else None,
        "routing_caveats": list(store.meta.extra.get("capture", {}).get("routing_caveats", [])),
    }
    if as_json:
        c.print_json(result)
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("wrote", result["path"])
    table.add_row("tokens", f"{result['tokens']:,} ({result['phase']})")
    table.add_row("sequences", f"{result['sequences']:,} from {result['documents']:,} documents")
    table.add_row("layers", f"{result['layers']} MoE layers, top-{result['top_k']} of {result['n_experts']} experts")
    table.add_row("speed", f"{result['tokens_per_s'] or 0:,.1f} tokens/s ({result['seconds']:.1f} s)")
    for caveat in result["routing_caveats"]:
        table.add_row("caveat", escape(caveat))
    c.console().print(table)
