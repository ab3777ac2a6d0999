"""`capture_llama`: run a GGUF MoE model with llama.cpp and stream the routing it used to a trace store.

The model runs in a `moescope.gguf.runtime.LlamaSession`, whose eval-callback tap reads what every MoE
layer of llama.cpp's ``build_moe_ffn`` selected and the gate weights it applied. Two modes, as in
`moescope.capture.hf`:

- ``prefill``: each document (tokenised with the GGUF's own tokenizer, or given as token ids) is cut into
  sequences of at most ``seq_len`` tokens; each sequence is one ``llama_decode`` in a cleared KV cache;
- ``decode``: per document, the first ``prompt_len`` tokens are the prompt, then ``generate`` greedy steps
  (argmax of the logits), one token per ``llama_decode``; only the generated tokens are recorded.

The GGUF is checked (exists, GGUF magic, an ``{arch}.expert_count`` key, ``ffn_gate_inp`` tensors) with
the ``gguf`` package before llama.cpp loads it and before the store is created. The store is written in
place (``TraceWriter(atomic=False)``), committed chunk by chunk. For bit-level agreement with the
transformers capture of an f32 model use ``flash_attn=False, kv_type="f32"``. Where llama.cpp's routing
rule is known to differ from the reference model's, `ROUTING_CAVEATS` says so in the trace and the log.

The optional extras of the transformers capture, with the same shapes and meaning:

- ``lookahead N`` (0-3): at every MoE layer, the experts the routers of the next N MoE layers choose from
  the hidden state entering this layer's router (``src[1]`` of llama.cpp's ``ffn_moe_logits``), with the
  architecture's selection rule as ``build_moe_ffn`` applies it (`moescope.gguf.routing`: gating,
  ``exp_probs_b``, expert groups, top-k); -1 past the last MoE layer. An architecture whose rule moescope
  has not checked is refused (`UsageError`), never predicted with another rule;
- ``candidates M``: each router's top-M experts by logit (``ffn_moe_logits``, plus the router bias where
  the GGUF has one) and their probabilities, the softmax of those logits over all experts; for routers that
  select with ``exp_probs_b`` (DeepSeek-V3), the ranking is the logits', not the selection's, as in
  `moescope.capture.routers`.

Not done here: sampling other than greedy, batches of several sequences per decode, multimodal models,
downloads.

    >>> capture_llama("qwen3-30b-a3b-q4_k_m.gguf", read_corpus("corpus/"), "qwen.zarr", max_tokens=100_000)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from moescope.capture.common import capture_writer, check_capture
from moescope.capture.routers import check_extra_options, extra_shapes
from moescope.corpus import Document, Seq, cut_sequences
from moescope.errors import CaptureError, TraceError, UsageError
from moescope.gguf import GGUFModel, inspect_gguf
from moescope.gguf.routing import top_candidates
from moescope.gguf.runtime import KV_TYPES, LlamaSession, llama_cpp, parse_override, session_top_k
from moescope.trace import TraceMeta, utc_now

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RoutingCaveat:
    """A GGUF architecture whose routing in llama.cpp is known to differ from the reference model's.

    applies : tells from the GGUF's layout whether the caveat holds; text : what differs and where, for the
    user (and the trace's provenance); source : the llama.cpp code that shows it.
    """

    applies: Callable[[GGUFModel], bool]
    text: str
    source: str


ROUTING_CAVEATS = (
    RoutingCaveat(
        lambda m: m.architecture == "deepseek2" and m.expert_groups > 1 and m.gating in (None, "softmax"),
        "llama.cpp routes this deepseek2 GGUF (expert groups with softmax gating: DeepSeek-V2's "
        "group_limited_greedy) by scoring each group with the sum of its two best experts (DeepSeek-V3's rule); "
        "the reference model scores a group by its best expert, so llama.cpp picks other experts for some tokens",
        "src/llama-graph.cpp build_moe_ffn: ggml_argsort_top_k(selection_groups, 2) then ggml_sum_rows",
    ),
    RoutingCaveat(
        lambda m: m.architecture == "phimoe",
        "llama.cpp runs PhiMoE with RMSNorm (+ bias) where the reference uses LayerNorm, and weighs the top-2 "
        "experts by a softmax over them where the reference uses sparsemixer; hidden states, and so the routing "
        "of later layers, drift from the reference's",
        "src/models/phi3.cpp: build_norm(..., LLM_NORM_RMS) and build_moe_ffn(..., GATING_FUNC_TYPE_SOFTMAX)",
    ),
)


def routing_caveats(info: GGUFModel) -> list[str]:
    """Where llama.cpp's routing for this GGUF is known to differ from the reference model's (transformers),
    in words (`ROUTING_CAVEATS`); empty when it is the same rule. What llama.cpp did is still what is
    recorded; ``moescope compare`` with a transformers capture measures how far the two differ."""
    return [
        f"{c.text}. This trace records what llama.cpp did; compare it with a transformers capture "
        f"(moescope compare) to see how far the two differ (llama.cpp: {c.source})"
        for c in ROUTING_CAVEATS
        if c.applies(info)
    ]


# -- the capture ---------------------------------------------------------------------------------------
def _plan(
    items: Sequence[Document | Sequence[int]],
    tokenize: Callable[[str], list[int]],
    *,
    mode: str,
    seq_len: int,
    prompt_len: int | None,
    max_tokens: int | None,
) -> list[Seq]:
    """Documents (tokenised with the GGUF's tokenizer) or token-id lists -> the sequences to run."""
    kinds = {isinstance(it, Document) for it in items}
    if len(kinds) != 1:
        raise UsageError("give either Documents or token-id lists, not a mix (labels would be partial)")
    tokenised = (
        (tokenize(it.text), it.label) if isinstance(it, Document) else ([int(t) for t in it], None) for it in items
    )
    return cut_sequences(tokenised, mode=mode, seq_len=seq_len, prompt_len=prompt_len, max_tokens=max_tokens)


def capture_llama(
    gguf_path: str | os.PathLike,
    documents: Sequence[Document] | Sequence[Sequence[int]],
    out_path: str | os.PathLike,
    *,
    mode: str = "prefill",
    seq_len: int = 512,
    generate: int = 0,
    prompt_len: int | None = None,
    max_tokens: int | None = None,
    n_threads: int | None = None,
    flash_attn: bool | None = None,
    kv_type: str = "f16",
    n_gpu_layers: int = 0,
    overrides: Sequence[str] = (),
    add_special: bool = True,
    ignore_eos: bool = False,
    lookahead: int = 0,
    candidates: int = 0,
    corpus: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Run a GGUF MoE model with llama.cpp over `documents` and stream its routing to a store at `out_path`.

    Parameters
    ----------
    gguf_path : a local ``.gguf`` file of a Mixture-of-Experts model.
    documents : [documents] `Document` (tokenised with the GGUF's tokenizer; labels kept), or
        [sequences] token-id lists (run as given, unlabelled; to compare with another capture on the
        same ids).
    out_path : the store to create (a Zarr folder, written in place and readable while it grows).
    mode : ``"prefill"`` (sequences of at most `seq_len` tokens, one decode each, fresh KV cache) or
        ``"decode"`` (`generate` greedy tokens after a prompt of the first `prompt_len` tokens, default
        `seq_len`; only generated tokens recorded; stops at an end-of-generation token unless `ignore_eos`).
    max_tokens : stop after this many recorded tokens.
    n_threads : CPU threads (default all).
    flash_attn : True / False / None (llama.cpp decides). Use False with ``kv_type="f32"`` for exactness.
    kv_type : ``"f16"`` or ``"f32"`` KV cache.
    n_gpu_layers : layers to offload on GPU builds.
    overrides : llama.cpp ``KEY=TYPE:VALUE`` metadata overrides (e.g. ``qwen3moe.expert_used_count=int:4``).
    add_special : let the GGUF's tokenizer add BOS / EOS as its metadata says.
    lookahead : N, also record at every MoE layer what the routers of the next N MoE layers (read from the
        GGUF) choose from the hidden state entering this layer's router, with llama.cpp's selection rule for
        the architecture (0-3; the ``lookahead`` extra, [tokens, layers, N, k], -1 past the last MoE layer;
        module docstring). `UsageError` for an architecture whose rule `moescope.gguf.routing` lacks.
    candidates : M, also record each router's top-M experts by logit and their softmax probabilities
        (0, or top-k < M <= experts; the ``candidates`` / ``candidate_probs`` extras, [tokens, layers, M]).
    corpus : the corpus path, for the metadata.
    progress : called as ``progress(tokens_recorded, tokens_planned)`` after each decode.

    Returns
    -------
    `out_path`. The GGUF, options and corpus are checked before the store is created; a capture that
    fails later leaves every committed token readable, marked incomplete.
    """
    if kv_type not in KV_TYPES:
        raise UsageError(f"kv_type {kv_type!r} is not one of {', '.join(KV_TYPES)}")
    out = check_capture(
        mode,
        documents,
        out_path,
        seq_len=seq_len,
        generate=generate,
        prompt_len=prompt_len,
        max_tokens=max_tokens,
        overwrite=overwrite,
    )
    parsed = [parse_override(s) for s in overrides]
    path = Path(gguf_path)
    info = inspect_gguf(path)
    top_k = session_top_k(info, parsed)
    check_extra_options(lookahead, candidates, top_k, info.n_experts)  # the rule: LlamaSession, before loading
    lib = llama_cpp()
    n_ctx = seq_len if mode == "prefill" else (prompt_len or seq_len) + generate
    with LlamaSession(
        path,
        info,
        n_ctx=n_ctx,
        n_threads=n_threads,
        flash_attn=flash_attn,
        kv_type=kv_type,
        n_gpu_layers=n_gpu_layers,
        overrides=parsed,
        lookahead=lookahead,
        router_logits=bool(candidates),
    ) as session:
        plan = _plan(
            documents,
            lambda text: session.tokenize(text, add_special),
            mode=mode,
            seq_len=seq_len,
            prompt_len=prompt_len,
            max_tokens=max_tokens,
        )
        planned = sum(len(s.ids) for s in plan) if mode == "prefill" else len(plan) * generate
        planned = min(planned, max_tokens or planned)
        session.run(plan[0].ids[:4])  # unreadable routing fails here, before the store exists
        session.clear()
        caveats = routing_caveats(info)
        for caveat in caveats:
            log.warning("%s", caveat)
        meta = TraceMeta(
            model=str(path),
            source=f"llama.cpp (llama-cpp-python {lib.__version__})",
            corpus=corpus,
            created=utc_now(),
            extra={
                "capture": {
                    "mode": mode,
                    "seq_len": seq_len,
                    "generate": generate,
                    "prompt_len": prompt_len,
                    "architecture": info.architecture,
                    "gguf_name": info.name,
                    "flash_attn": flash_attn,
                    "kv_type": kv_type,
                    "overrides": list(overrides),
                    "llama_cpp_python": lib.__version__,
                    "routing_caveats": caveats,
                    "lookahead": lookahead,
                    "candidates": candidates,
                    **({"lookahead_rule": dataclasses.asdict(session.lookahead.rule)} if session.lookahead else {}),
                }
            },
        )
        with capture_writer(
            out,
            n_experts=info.n_experts,
            top_k=session.top_k,
            layer_ids=info.layer_ids,
            mode=mode,
            meta=meta,
            overwrite=overwrite,
            extras=extra_shapes(len(info.layer_ids), session.top_k, lookahead, candidates),
        ) as writer:
            labelled = plan[0].label is not None
            for seq in plan:
                session.clear()
                step = _decode if mode == "decode" else _prefill
                experts, weights, tokens, raw = step(session, seq, generate, ignore_eos)
                room = planned - writer.n_tokens
                if experts.shape[0] == 0:
                    continue
                extras = {name: x[:room] for name, x in _trace_extras(raw, candidates).items()}
                try:
                    writer.append(
                        experts[:room],
                        weights[:room],
                        labels=[seq.label] if labelled else None,
                        seq_starts=[0],
                        token_ids=tokens[:room],
                        extras=extras,
                    )
                except TraceError as exc:
                    raise CaptureError(
                        f"the routing read from llama.cpp ({info.architecture}) failed the sanity check: {exc}; "
                        f"report this with the GGUF's architecture and llama-cpp-python version"
                    ) from exc
                if progress is not None:
                    progress(writer.n_tokens, planned)
                if writer.n_tokens >= planned:
                    break
    return out


def _trace_extras(raw: dict[str, np.ndarray], candidates: int) -> dict[str, np.ndarray]:
    """The session's extras -> the trace's: lookahead as is, router logits -> top-M candidates."""
    out = {}
    if "lookahead" in raw:
        out["lookahead"] = raw["lookahead"]
    if candidates:
        logits = raw["router_logits"]  # [tokens, layers, experts]
        n_tokens, n_layers, n_experts = logits.shape
        ids, probs = top_candidates(logits.reshape(-1, n_experts), candidates)
        out["candidates"] = ids.reshape(n_tokens, n_layers, candidates)
        out["candidate_probs"] = probs.reshape(n_tokens, n_layers, candidates)
    return out


# experts, weights [tokens, layers, k]; the token ids run; the session's extras (`LlamaSession.run_all`)
Routed = tuple[np.ndarray, np.ndarray, list[int], dict[str, np.ndarray]]


def _prefill(session: LlamaSession, seq: Seq, _generate: int, _ignore_eos: bool) -> Routed:
    experts, weights, extras = session.run_all(seq.ids)
    return experts, weights, list(seq.ids), extras


def _decode(session: LlamaSession, seq: Seq, generate: int, ignore_eos: bool) -> Routed:
    """Greedy generation after the prompt; the routing of each generated token, in order."""
    session.run(seq.ids)  # the prompt's routing is not part of a decode trace
    pos, rows, tokens = len(seq.ids), [], []
    for _step in range(generate):
        token = session.argmax_last()
        if not ignore_eos and session.is_eog(token):
            break
        rows.append(session.run_all([token], start_pos=pos))
        tokens.append(token)
        pos += 1
    if not rows:
        shape = (0, len(session.info.layer_ids), session.top_k)
        return np.zeros(shape, np.int64), np.zeros(shape), [], {}
    extras = {name: np.concatenate([r[2][name] for r in rows]) for name in rows[0][2]}
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]), tokens, extras
