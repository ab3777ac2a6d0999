"""Shared fixtures: tiny seeded traces built in memory, and the optional real-data folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from moescope.trace import RoutingTrace

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def random_trace(
    n_tokens: int = 50,
    n_layers: int = 2,
    n_experts: int = 8,
    k: int = 2,
    n_seq: int = 4,
    seed: int = 0,
    weights: str | None = "float32",
    labels: bool = True,
    token_ids: bool = False,
    lookahead: int = 0,
    candidates: int = 0,
) -> RoutingTrace:
    """A small valid trace with distinct ids per token, random sequence cuts, labels and (optional) token ids."""
    rng = np.random.default_rng(seed)
    experts = np.argsort(rng.random((n_tokens, n_layers, n_experts)), axis=2)[..., :k].astype(np.int16)
    w = None
    if weights:
        raw = rng.random((n_tokens, n_layers, k)) + 0.05
        w = (raw / raw.sum(axis=2, keepdims=True)).astype(weights)
    cuts = np.sort(rng.choice(np.arange(1, n_tokens), size=n_seq - 1, replace=False)) if n_seq > 1 else []
    starts = np.concatenate([[0], cuts]).astype(np.int64)
    seq_labels = [("law", "code", "chat")[i % 3] for i in range(n_seq)] if labels else None
    return RoutingTrace(
        experts,
        n_experts,
        weights=w,
        seq_starts=starts,
        seq_labels=seq_labels,
        layer_ids=np.arange(1, n_layers + 1),
        meta={"model": "tiny-test", "source": "conftest"},
        token_ids=rng.integers(0, 50_000, n_tokens) if token_ids else None,
        extras=_extras(rng, experts, n_experts, lookahead, candidates),
    )


def _extras(rng, experts, n_experts: int, lookahead: int, candidates: int) -> dict:
    """Random lookahead [tokens, layers, lookahead, k] (-1 past the last layer) and candidates [tokens, layers,
    M] with probabilities, shaped as captures write them."""
    n_tokens, n_layers, k = experts.shape
    out = {}
    if lookahead:
        la = np.argsort(rng.random((n_tokens, n_layers, lookahead, n_experts)), axis=3)[..., :k].astype(np.int16)
        for d in range(lookahead):
            la[:, n_layers - 1 - d :, d] = -1  # no layer l + d + 1
        out["lookahead"] = la
    if candidates:
        out["candidates"] = np.argsort(rng.random((n_tokens, n_layers, n_experts)), axis=2)[..., :candidates]
        p = rng.random((n_tokens, n_layers, candidates))
        out["candidate_probs"] = -np.sort(-p / p.sum(axis=2, keepdims=True), axis=2)
    return out


def run(capsys, *args) -> tuple[int, str, str]:
    """Run the moescope command line in-process: ``(exit code, stdout, stderr)``."""
    from moescope.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def same_json(capsys, command: str, first, second, *args) -> dict:
    """Run `command` on `first`, then on `second`, with the same `args` (ending in --json): both exit 0 and
    print the same JSON, which is returned parsed."""
    outs = []
    for src in (first, second):
        code, out, err = run(capsys, command, src, *args)
        assert code == 0, err
        outs.append(json.loads(out))
    assert outs[0] == outs[1]
    return outs[0]


@pytest.fixture
def tiny_trace() -> RoutingTrace:
    return random_trace()


@pytest.fixture
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip("../shared/realdata is absent")
    return REALDATA


# hypothesis keeps no example database in the working directory (tests never write to the cwd)
settings.register_profile("moescope", database=None, deadline=None)
settings.load_profile("moescope")


def routing_with_logits(model, batches):
    """The transformers capture of `batches` (token-id batches, each [rows, tokens]) by `RouterRecorder`,
    with each router's logits (its output 0) recorded beside it.

    Returns experts, weights: [tokens, layers, k]; logits: [tokens, layers, experts] float32; layer ids.
    """
    import torch

    from moescope.capture import RouterRecorder

    rec = RouterRecorder(model)
    modules = dict(model.named_modules())
    logits: list[list] = [[] for _ in rec.sites]
    hooks = [
        modules[s.name].register_forward_hook(lambda m, a, out, i=i: logits[i].append(out[0].detach()))
        for i, s in enumerate(rec.sites)
    ]
    experts, weights = [], []
    try:
        with rec, torch.inference_mode():
            for ids in batches:
                model(input_ids=torch.tensor(ids), use_cache=False)
                e, w = rec.collect()
                experts.append(e)
                weights.append(w)
    finally:
        for h in hooks:
            h.remove()
    stacked = torch.stack([torch.cat(x).reshape(-1, x[0].shape[-1]) for x in logits], dim=1).float().numpy()
    return np.concatenate(experts), np.concatenate(weights), stacked, rec.layer_ids
