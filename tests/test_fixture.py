"""The committed fixture: a tiny trained Qwen3-MoE, its held-out text, and the trace captured from it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moescope import fixture
from moescope.imports import read_input

DOMAINS = ["code", "i18n", "man", "numbers", "prose"]


def test_files_small_and_described():
    cfg = json.loads((fixture.MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    n_experts = cfg.get("num_experts", cfg.get("num_local_experts"))  # transformers 5 writes the latter
    assert (cfg["num_hidden_layers"], n_experts, cfg["num_experts_per_tok"]) == (4, 16, 2)
    assert (fixture.MODEL_DIR / "model.safetensors").stat().st_size < 10 << 20
    report = json.loads(fixture.TRAINING_REPORT.read_text())
    assert report["heldout_perplexity"] < 60 and report["train_minutes"] <= 10
    assert sorted(p.name for p in fixture.HELDOUT_DIR.iterdir()) == DOMAINS


def test_committed_trace():
    tr = read_input(fixture.TRACE)
    assert (tr.n_layers, tr.top_k, tr.n_experts, tr.phase) == (4, 2, 16, "prefill")
    assert sorted(tr.labels()) == DOMAINS and tr.n_tokens > 10_000
    assert tr.weights is not None and tr.meta.source.startswith("transformers")


def _recorded(model, ids):
    import torch

    from moescope.capture import RouterRecorder

    with RouterRecorder(model) as rec, torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
        experts, weights = rec.collect()
    return out, experts, weights


def test_hooks_equal_topk_of_router_logits_on_fixture():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from moescope.capture.hf import load_hf_model, load_tokenizer

    model = load_hf_model(fixture.MODEL_DIR)
    tok = load_tokenizer(fixture.MODEL_DIR)
    text = (fixture.HELDOUT_DIR / "code" / "0.txt").read_text(encoding="utf-8")
    ids = tok(text)["input_ids"][:400]
    out, experts, weights = _recorded(model, ids)
    assert experts.shape == (len(ids), 4, 2)
    for layer, logits in enumerate(out.router_logits):
        top_w, top_i = torch.topk(torch.softmax(logits.float(), dim=-1), 2, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)  # norm_topk_prob
        np.testing.assert_array_equal(np.sort(experts[:, layer], axis=1), np.sort(top_i.numpy(), axis=1))
        np.testing.assert_allclose(np.sort(weights[:, layer], axis=1), np.sort(top_w.numpy(), axis=1), rtol=1e-5)


def test_recapture_reproduces_committed_trace(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from moescope.capture import capture_hf, read_corpus

    out = capture_hf(fixture.MODEL_DIR, None, read_corpus(fixture.HELDOUT_DIR), tmp_path / "re.zarr")
    again, committed = read_input(out), read_input(fixture.TRACE)
    assert again.n_tokens == committed.n_tokens
    np.testing.assert_array_equal(again.seq_starts, committed.seq_starts)
    assert again.seq_labels.tolist() == committed.seq_labels.tolist()
    same = (np.sort(again.experts, axis=2) == np.sort(committed.experts, axis=2)).all(axis=2)
    # same machine: identical; other CPUs may flip near-ties, never more than 0.1% of token-layers
    assert same.mean() >= 0.999, same.mean()
