"""How much quality a GGUF variant keeps: fewer experts per token (top-k reduction) or an expert subset.

Every variant runs the same token windows as the reference (the model as published, its own top-k), in
lockstep, through llama.cpp (llama-cpp-python); per window both produce next-token distributions, and we
accumulate

- perplexity of the variant on the text (next-token negative log-likelihood, exp of the mean);
- KL(reference || variant) of the next-token distributions, mean over positions (nats);
- top-1 agreement: the share of positions where both predict the same next token;
- prefill tokens/s of the variant (wall time of its batched forward passes on this machine).

Top-k is changed the way llama.cpp users do it, with a metadata override of ``<arch>.expert_used_count``.
Needs the ``[llama]`` extra; reads the corpus with `moescope.capture.read_corpus`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.corpus import Document, cut_sequences
from moescope.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Variant:
    """A model to score: a label, its GGUF, llama.cpp metadata overrides ``[(key, type, value)]``."""

    label: str
    path: Path
    overrides: tuple[tuple[str, str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class VariantScore:
    label: str
    path: str
    tokens: int
    perplexity: float
    kl_vs_reference: float
    top1_agreement: float
    prefill_tokens_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def evaluate(
    reference: Variant,
    variants: Sequence[Variant],
    docs: Sequence[Document],
    *,
    seq_len: int = 512,
    max_tokens: int = 4096,
    n_threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[VariantScore]:
    """Score each variant against `reference` on the same windows of `docs` (see the module docstring)."""
    from moescope.gguf.inspect import inspect_gguf
    from moescope.gguf.runtime import LlamaSession

    if seq_len < 2:
        raise UsageError(f"--seq-len {seq_len}: need at least 2 tokens per window to score next-token predictions")
    ref = LlamaSession(
        reference.path,
        inspect_gguf(reference.path),
        n_ctx=seq_len,
        n_threads=n_threads,
        overrides=reference.overrides,
        record=False,
    )
    sessions: list[Any] = []
    try:
        for v in variants:
            same = v.path == reference.path and v.overrides == reference.overrides
            sessions.append(
                None
                if same
                else LlamaSession(
                    v.path,
                    inspect_gguf(v.path),
                    n_ctx=seq_len,
                    n_threads=n_threads,
                    overrides=v.overrides,
                    record=False,
                )
            )
        for v, s in zip(variants, sessions, strict=True):
            if s is not None and s.n_vocab != ref.n_vocab:
                raise UsageError(f"{v.label}: vocabulary of {s.n_vocab} tokens, the reference has {ref.n_vocab}")
        seqs = cut_sequences(
            ((ref.tokenize(d.text), d.label) for d in docs),
            mode="prefill",
            seq_len=seq_len,
            prompt_len=None,
            max_tokens=max_tokens,
        )
        seqs = [s for s in seqs if len(s.ids) >= 2]
        if not seqs:
            raise UsageError("the corpus gives no window of 2 or more tokens; give more text")
        n_var = len(variants)
        nll = np.zeros(n_var)
        kl = np.zeros(n_var)
        agree = np.zeros(n_var)
        secs = np.zeros(n_var)
        scored = 0
        for si, seq in enumerate(seqs):
            ids = seq.ids
            n = len(ids)
            ref.clear()
            t0 = time.perf_counter()
            ref.decode(ids)
            t_ref = time.perf_counter() - t0
            lp_ref = _log_softmax(ref.logits(n))[:-1]
            target = np.asarray(ids[1:])
            p_ref = np.exp(lp_ref)
            for vi, s in enumerate(sessions):
                if s is None:
                    lp, dt = lp_ref, t_ref
                else:
                    s.clear()
                    t0 = time.perf_counter()
                    s.decode(ids)
                    dt = time.perf_counter() - t0
                    lp = _log_softmax(s.logits(n))[:-1]
                nll[vi] -= lp[np.arange(n - 1), target].sum()
                kl[vi] += float((p_ref * (lp_ref - lp)).sum())
                agree[vi] += float((lp.argmax(axis=1) == lp_ref.argmax(axis=1)).sum())
                secs[vi] += dt
            scored += n - 1
            if progress:
                progress(si + 1, len(seqs))
        total = sum(len(s.ids) for s in seqs)
        return [
            VariantScore(
                v.label,
                str(v.path),
                scored,
                float(np.exp(nll[i] / scored)),
                max(0.0, float(kl[i] / scored)),
                float(agree[i] / scored),
                float(total / secs[i]) if secs[i] > 0 else float("inf"),
            )
            for i, v in enumerate(variants)
        ]
    finally:
        for s in sessions:
            if s is not None:
                s.close()
        ref.close()


def recommend_k(scores: Sequence[VariantScore], ks: Sequence[int], native: int, tolerance: float) -> int:
    """The smallest k (at most the native one) whose perplexity is within `tolerance` (relative) of the
    native k's."""
    base = next(s.perplexity for s, k in zip(scores, ks, strict=True) if k == native)
    ok = [k for s, k in zip(scores, ks, strict=True) if k <= native and s.perplexity <= base * (1 + tolerance)]
    return min(ok) if ok else native
