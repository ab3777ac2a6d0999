"""`capture_hf`: run a Hugging Face transformers MoE model over a corpus and stream its routing to a store.

What the routers did is read by `RouterRecorder` hooks (`moescope.capture.routers`): the ids and weights
the model actually used. Two modes:

- ``prefill``: teacher-forced; each document is cut into sequences of at most ``seq_len`` tokens (the
  tokenizer's special tokens, e.g. BOS, only at the start of a document), padded into batches;
- ``decode``: per document, the first ``prompt_len`` tokens are the prompt, then greedy generation with
  a KV cache, one token per forward; only the generated tokens' routing is recorded (step i feeds the
  token step i-1 chose), one sequence per document, phase ``decode``.

The model, tokenizer and corpus are checked (routers found, one probe forward, non-empty tokens) before
the store is created, so bad inputs leave nothing behind. The store is written in place
(``TraceWriter(atomic=False)``): a capture that dies keeps every committed chunk readable, marked
incomplete. Not done here: sampling, batched decode, multi-GPU sharding, remote code, downloads
(models are read from a local folder only).

    >>> capture_hf("models/OLMoE-1B-7B", None, read_corpus("corpus/"), "olmoe.zarr", max_tokens=100_000)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope.capture.common import capture_writer, check_capture
from moescope.capture.routers import CaptureError, RouterRecorder, _torch, find_routers
from moescope.corpus import Document, Seq, cut_sequences
from moescope.errors import TraceError, UsageError, require
from moescope.store import TraceWriter
from moescope.trace import TraceMeta, utc_now

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_BATCH = 8  # prefill sequences per forward


def _transformers() -> Any:
    return require("transformers", "hf", "capturing routing from transformers models")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a `DTYPES` name (UsageError otherwise)."""
    if name not in DTYPES:
        raise UsageError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(_torch(), name)


def check_device(device: str) -> str:
    """`device` if torch can use it here, else a UsageError with the fix."""
    torch = _torch()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} was asked for but torch sees no CUDA GPU; use --device cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise UsageError(f"device {device!r} is not a torch device name; use cpu, cuda or cuda:N") from None
    return device


def load_hf_model(path: str | os.PathLike, device: str = "cpu", dtype: str = "float32") -> Any:
    """Load a causal-LM MoE model from a local folder (nothing is downloaded), in eval mode.

    The routers are looked for on an empty (meta-device) copy first, so a dense model is refused
    before its weights are read.

    Raises
    ------
    CaptureError : the folder is missing, not a transformers model, or not a MoE model.
    """
    torch, tf = _torch(), _transformers()
    folder = Path(path)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise CaptureError(
            f"model folder {str(folder)!r} {what}; capture reads a local transformers model folder "
            f"(download one first, e.g. hf download Qwen/Qwen1.5-MoE-A2.7B --local-dir {folder.name or 'DIR'})"
        )
    dt, device = torch_dtype(dtype), check_device(device)
    try:
        config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            empty = tf.AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise CaptureError(
            f"cannot build a causal LM from {str(folder)!r} with transformers {tf.__version__} ({exc}); "
            f"check the folder's config.json, or upgrade transformers for a newer architecture"
        ) from None
    find_routers(empty)  # refuse a dense model before reading its weights
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dt, local_files_only=True)
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved in a local model folder."""
    folder = Path(path)
    try:
        return _transformers().AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CaptureError(f"no usable tokenizer in {str(folder)!r} ({exc}); pass a tokenizer explicitly") from None


def plan_sequences(
    documents: Sequence[Document] | Sequence[Sequence[int]],
    tokenizer: Any,
    *,
    mode: str,
    seq_len: int,
    prompt_len: int | None,
    max_tokens: int | None,
    vocab_size: int | None,
) -> list[Seq]:
    """Tokenise documents (or take token-id lists as given, unlabelled) into the sequences to run (see
    `cut_sequences`), checking ids fit the model."""
    kinds = {isinstance(d, Document) for d in documents}
    if len(kinds) != 1:
        raise UsageError("give either Documents or token-id lists, not a mix (labels would be partial)")

    def tokenised():
        for doc in documents:
            if isinstance(doc, Document):
                source, label = doc.source, doc.label
                ids = list(tokenizer(doc.text, add_special_tokens=True, verbose=False)["input_ids"])
            else:
                source, label, ids = "token ids", None, [int(t) for t in doc]
            if ids and (min(ids) < 0 or (vocab_size is not None and max(ids) >= vocab_size)):
                bad = min(ids) if min(ids) < 0 else max(ids)
                raise CaptureError(
                    f"{source}: token id {bad} is outside the model's {vocab_size} embeddings; "
                    f"use the model's own tokenizer"
                )
            yield ids, label

    return cut_sequences(tokenised(), mode=mode, seq_len=seq_len, prompt_len=prompt_len, max_tokens=max_tokens)


def capture_hf(
    model: Any,
    tokenizer: Any,
    documents: Sequence[Document] | Sequence[Sequence[int]],
    out_path: str | os.PathLike,
    *,
    mode: str = "prefill",
    seq_len: int = 512,
    generate: int = 0,
    prompt_len: int | None = None,
    max_tokens: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = DEFAULT_BATCH,
    ignore_eos: bool = False,
    lookahead: int = 0,
    candidates: int = 0,
    corpus: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Run `model` over `documents` and stream its routing to a trace store at `out_path`.

    Parameters
    ----------
    model : a local model folder (loaded with `load_hf_model` on `device` / `dtype`) or a loaded model
        (run where it is; `device` and `dtype` are then unused).
    tokenizer : a tokenizer, or None to load the one saved with the model.
    documents : [documents] `Document`, e.g. from `read_corpus`; the label of each becomes its sequences'.
        Or [sequences] token-id lists, run as given and unlabelled (to compare with another capture of the
        same ids, e.g. llama.cpp's).
    out_path : the store to create (a Zarr folder, written in place and readable while it grows).
    mode : ``"prefill"``: each document cut into sequences of at most `seq_len` tokens, teacher-forced,
        `batch_size` sequences per forward; ``"decode"``: `generate` greedy steps per document after a
        prompt of its first `prompt_len` tokens (default `seq_len`); only the generated tokens' routing is
        recorded (step i feeds the token step i-1 chose), one sequence per document, stopping early at an
        end-of-sequence token unless `ignore_eos`.
    lookahead : N, record what the routers of the next N MoE layers choose from each router's input (0-3;
        `moescope.capture.routers`).
    candidates : M, record each router's top-M experts and probabilities (0, or top-k < M <= experts).
    max_tokens : stop after this many recorded tokens.
    corpus : the corpus path, for the metadata.
    progress : called as ``progress(tokens_recorded, tokens_planned)`` after each forward.

    Returns
    -------
    `out_path`. The model, tokenizer and corpus are checked before the store is created; if the capture
    fails later, the store keeps every committed token and stays marked incomplete.
    """
    torch, tf = _torch(), _transformers()
    out = check_capture(
        mode,
        documents,
        out_path,
        seq_len=seq_len,
        generate=generate,
        prompt_len=prompt_len,
        max_tokens=max_tokens,
        overwrite=overwrite,
        batch_size=batch_size,
    )
    model_name = str(model) if isinstance(model, (str, os.PathLike)) else (model.name_or_path or type(model).__name__)
    if isinstance(model, (str, os.PathLike)):
        model = load_hf_model(model, device, dtype)
    if tokenizer is None:
        tokenizer = load_tokenizer(model.name_or_path)
    recorder = RouterRecorder(model, lookahead=lookahead, candidates=candidates)
    plan = plan_sequences(
        documents,
        tokenizer,
        mode=mode,
        seq_len=seq_len,
        prompt_len=prompt_len,
        max_tokens=max_tokens,
        vocab_size=getattr(model.get_input_embeddings(), "num_embeddings", None),
    )
    planned = sum(len(s.ids) for s in plan) if mode == "prefill" else len(plan) * generate
    planned = min(planned, max_tokens or planned)
    dev = next(model.parameters()).device
    meta = TraceMeta(
        model=model_name,
        source=f"transformers {tf.__version__}",
        corpus=corpus,
        created=utc_now(),
        extra={
            "capture": {
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "device": str(dev),
                "mode": mode,
                "seq_len": seq_len,
                "generate": generate,
                "prompt_len": prompt_len,
                "architecture": type(model).__name__,
                "routers": recorder.router_classes,
                "lookahead": lookahead,
                "candidates": candidates,
                "transformers": tf.__version__,
            }
        },
    )
    with recorder, torch.inference_mode():
        _probe(model, recorder, plan[0].ids[:4], dev)  # unreadable routers fail here, before the store exists
        with capture_writer(
            out,
            n_experts=recorder.n_experts,
            top_k=recorder.top_k,
            layer_ids=recorder.layer_ids,
            mode=mode,
            meta=meta,
            overwrite=overwrite,
            extras=recorder.extra_shapes(),
        ) as writer:
            steps = _prefill if mode == "prefill" else _decode
            for experts, weights, starts, labels, extras in steps(
                model, recorder, plan, dev, batch_size=batch_size, generate=generate, ignore_eos=ignore_eos
            ):
                room = planned - writer.n_tokens
                keep = int(np.searchsorted(starts, room)) if len(experts) > room else len(starts)
                cut = {name: x[:room] for name, x in extras.items()}
                _append(writer, experts[:room], weights[:room], starts[:keep], labels[:keep], cut, recorder)
                if progress is not None:
                    progress(writer.n_tokens, planned)
                if writer.n_tokens >= planned:
                    break
    return out


def _probe(model: Any, recorder: RouterRecorder, ids: list[int], dev: Any) -> None:
    torch = _torch()
    model(input_ids=torch.tensor([ids], device=dev), use_cache=False)
    experts, _ = recorder.collect()
    if experts.shape[0] != len(ids):
        raise CaptureError(f"the routers saw {experts.shape[0]} tokens for a {len(ids)}-token probe input")


def _append(
    writer: TraceWriter,
    experts: np.ndarray,
    weights: np.ndarray,
    starts: Any,
    labels: Any,
    extras: dict[str, np.ndarray],
    recorder: RouterRecorder,
) -> None:
    labels = list(labels)
    try:
        writer.append(
            experts, weights, seq_starts=starts, labels=None if labels[:1] == [None] else labels, extras=extras
        )
    except TraceError as exc:
        raise CaptureError(
            f"the routing captured from {type(recorder.model).__name__} ({', '.join(recorder.router_classes)}) "
            f"failed the sanity check: {exc}. The hooks read the wrong outputs; report this with the model class"
        ) from exc


def _prefill(model: Any, recorder: RouterRecorder, plan: list[Seq], dev: Any, *, batch_size: int, **_: Any):
    """Yield (experts, weights, seq_starts, labels, extras with the token ids) per batch of padded,
    teacher-forced sequences."""
    torch = _torch()
    for lo in range(0, len(plan), batch_size):
        batch = plan[lo : lo + batch_size]
        width = max(len(s.ids) for s in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, s in enumerate(batch):
            ids[row, : len(s.ids)] = torch.tensor(s.ids)
            mask[row, : len(s.ids)] = 1
        model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False, logits_to_keep=1)
        experts, weights, extras = recorder.collect_all(mask)
        extras["token_ids"] = np.concatenate([s.ids for s in batch])
        starts = np.cumsum([0] + [len(s.ids) for s in batch[:-1]])
        yield experts, weights, starts, [s.label for s in batch], extras


def _decode(
    model: Any, recorder: RouterRecorder, plan: list[Seq], dev: Any, *, generate: int, ignore_eos: bool, **_: Any
):
    """Yield (experts, weights, [0], [label], extras with the token ids) per document: the routing of each
    generated token."""
    torch = _torch()
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    stop = set() if ignore_eos or eos is None else {eos} if isinstance(eos, int) else set(eos)
    # the KV cache's name: `cache` since transformers 5.24 (past_key_values is deprecated), before it the old one
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for seq in plan:
        out = model(input_ids=torch.tensor([seq.ids], device=dev), use_cache=True, logits_to_keep=1)
        recorder.reset()  # the prompt's routing is not part of a decode trace
        rows: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []
        tokens = []
        for _step in range(generate):
            token = int(out.logits[0, -1].argmax())
            if token in stop:
                break
            tokens.append(token)
            out = model(
                input_ids=torch.tensor([[token]], device=dev),
                **{cache_arg: out[cache_arg]},
                use_cache=True,
                logits_to_keep=1,
            )
            rows.append(recorder.collect_all())
        if rows:
            extras = {name: np.concatenate([r[2][name] for r in rows]) for name in rows[0][2]}
            extras["token_ids"] = np.asarray(tokens)
            experts, weights = np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
            yield experts, weights, np.array([0]), [seq.label], extras
