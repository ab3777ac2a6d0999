"""What both capture engines (transformers, llama.cpp) share: the option checks made before a capture
creates its store, and the store every capture writes. No model runs here.

    >>> out = check_capture("prefill", docs, "run.zarr", seq_len=512, generate=0, prompt_len=None, ...)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moescope import _atomic
from moescope.corpus import MODES
from moescope.errors import FormatError, UsageError


def check_capture(
    mode: str,
    documents: Sequence[Any],
    out_path: str | os.PathLike,
    *,
    seq_len: int,
    generate: int,
    prompt_len: int | None,
    max_tokens: int | None,
    overwrite: bool,
    batch_size: int = 1,
) -> Path:
    """The option and corpus checks every capture engine makes before it creates its store.

    Returns the checked output path; raises `UsageError` / `FormatError` naming the bad value.
    """
    if mode not in MODES:
        raise UsageError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    for what, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("generate", generate, 0)):
        if value < low:
            raise UsageError(f"{what} is {value}; expected >= {low}")
    if mode == "decode" and generate < 1:
        raise UsageError("decode mode needs generate >= 1 (the number of tokens to generate per document)")
    if (prompt_len is not None and prompt_len < 1) or (max_tokens is not None and max_tokens < 1):
        raise UsageError(f"prompt_len {prompt_len} and max_tokens {max_tokens} must be >= 1 when given")
    out = _atomic.check_output(out_path, overwrite, kind=_atomic.TRACE_STORE)
    if not documents:
        raise FormatError("no documents to capture; give a non-empty corpus")
    return out


def capture_writer(
    out: Path,
    *,
    n_experts: int,
    top_k: int,
    layer_ids: Sequence[int],
    mode: str,
    meta: Any,
    overwrite: bool,
    extras: dict[str, tuple[int, ...]] | None = None,
) -> Any:
    """The store every capture engine writes: in place (readable while it grows), float32 gate weights, the
    token ids the model ran (and the `extras` asked for: lookahead, candidates), committed every full chunk
    and at least every `CAPTURE_COMMIT_SECONDS` (a crash loses at most that)."""
    from moescope.store import CAPTURE_COMMIT_SECONDS, TraceWriter

    return TraceWriter(
        out,
        n_experts=n_experts,
        n_layers=len(layer_ids),
        top_k=top_k,
        layer_ids=layer_ids,
        phase=mode,
        meta=meta,
        weights_dtype="float32",
        extras={"token_ids": (), **(extras or {})},
        overwrite=overwrite,
        atomic=False,
        commit_seconds=CAPTURE_COMMIT_SECONDS,
    )
