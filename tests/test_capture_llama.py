"""Capture through llama.cpp: the ggml eval callback records what the fixture GGUF really routed.

The oracle is the transformers capture (`RouterRecorder`) of the same model (``tiny-moe``, f32) on the
same token ids. With flash attention off and an f32 KV cache, llama.cpp must choose the same experts for
every token in every layer; with its defaults (f16 KV cache) it may differ only where the router's k-th
and (k+1)-th probabilities are a near-tie. Bad inputs are refused before a store is created.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from conftest import routing_with_logits, run  # noqa: E402
from moescope import fixture  # noqa: E402
from moescope.capture.llama import capture_llama  # noqa: E402
from moescope.errors import MoescopeError  # noqa: E402
from moescope.gguf import inspect_gguf  # noqa: E402
from moescope.gguf.runtime import parse_override  # noqa: E402
from moescope.store import TraceStore, load_trace  # noqa: E402

GGUF = fixture.GGUF  # committed; tools/convert_fixture_gguf.py rebuilds it
SEQ_LEN = 128
N_SEQ = 12


@pytest.fixture(scope="module")
def hf_tokens():
    """[N_SEQ] token-id lists cut from the held-out text with the fixture's own HF tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(fixture.MODEL_DIR / "tokenizer.json"))
    seqs = []
    for path in sorted(fixture.HELDOUT_DIR.glob("*/*.txt")):
        ids = tok.encode(path.read_text(encoding="utf-8")).ids
        seqs += [ids[lo : lo + SEQ_LEN] for lo in range(0, min(len(ids), 2 * SEQ_LEN), SEQ_LEN)]
    return [s for s in seqs if s][:N_SEQ]


@pytest.fixture(scope="module")
def hf_routing(hf_tokens):
    """The transformers capture of `hf_tokens`.

    Returns experts, weights: [tokens, layers, k]; router probabilities: [tokens, layers, experts].
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from moescope.capture import load_hf_model

    experts, weights, logits, _ = routing_with_logits(load_hf_model(fixture.MODEL_DIR), [[ids] for ids in hf_tokens])
    return experts, weights, torch.from_numpy(logits).softmax(-1).numpy()


def _llama(tmp_path, ids, name, **kw):
    out = capture_llama(GGUF, ids, tmp_path / name, seq_len=SEQ_LEN, **kw)
    return load_trace(out)


def _same_sets(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[tokens, layers] True where the two captures chose the same set of experts."""
    return np.all(np.sort(a, axis=2) == np.sort(b, axis=2), axis=2)


def test_gguf_is_the_fixture():
    info = inspect_gguf(GGUF)
    assert (info.architecture, info.n_experts, info.top_k, info.layer_ids) == ("qwen3moe", 16, 2, (0, 1, 2, 3))
    assert GGUF.stat().st_size < 10 << 20


def test_exact_settings_equal_transformers(tmp_path, hf_tokens, hf_routing):
    experts, weights, _ = hf_routing
    trace = _llama(tmp_path, hf_tokens, "exact.zarr", flash_attn=False, kv_type="f32")
    assert trace.n_tokens == experts.shape[0] == sum(map(len, hf_tokens))
    assert trace.seq_starts.tolist() == np.cumsum([0] + [len(s) for s in hf_tokens[:-1]]).tolist()
    assert trace.layer_ids.tolist() == [0, 1, 2, 3] and trace.phase == "prefill"
    assert trace.token_ids.tolist() == [t for s in hf_tokens for t in s]
    same = _same_sets(trace.experts, experts)
    assert same.all(), f"{(~same).sum()} token-layers differ"
    # same order too (both sort by descending probability), and the same renormalised gate weights
    np.testing.assert_array_equal(trace.experts, experts)
    np.testing.assert_allclose(trace.weights, weights, atol=1e-4)
    np.testing.assert_allclose(trace.weights.sum(axis=2), 1.0, atol=1e-5)


def test_default_settings_agree_except_near_ties(tmp_path, hf_tokens, hf_routing):
    experts, _, probs = hf_routing
    trace = _llama(tmp_path, hf_tokens, "default.zarr")
    same = _same_sets(trace.experts, experts)
    assert same.mean() >= 0.999, same.mean()
    top = -np.sort(-probs, axis=2)
    gap = top[..., 1] - top[..., 2]  # k-th minus (k+1)-th router probability (k = 2)
    assert np.all(gap[~same] < 1e-2), gap[~same]


def test_text_is_tokenised_like_transformers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from moescope.capture import read_corpus
    from moescope.gguf.runtime import LlamaSession

    tok = tokenizers.Tokenizer.from_file(str(fixture.MODEL_DIR / "tokenizer.json"))
    docs = read_corpus(fixture.HELDOUT_DIR)
    with LlamaSession(GGUF, inspect_gguf(GGUF), n_ctx=64) as session:
        for doc in docs:
            assert session.tokenize(doc.text, add_special=False) == tok.encode(doc.text).ids


def test_decode_mode(tmp_path, hf_tokens):
    trace = _llama(tmp_path, hf_tokens[:2], "dec.zarr", mode="decode", generate=5, prompt_len=16, ignore_eos=True)
    assert trace.phase == "decode" and trace.n_tokens == 10 and trace.seq_starts.tolist() == [0, 5]
    prompt = hf_tokens[0][:16]
    from moescope.gguf.runtime import LlamaSession

    with LlamaSession(GGUF, inspect_gguf(GGUF), n_ctx=32) as session:  # greedy by hand: the same 5 tokens
        session.run(prompt)
        want = []
        for pos in range(16, 21):
            want.append(session.argmax_last())
            session.run([want[-1]], start_pos=pos)
    assert trace.token_ids[:5].tolist() == want


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    args = ("capture", "llama", GGUF, fixture.HELDOUT_DIR, "-o", out, "--max-tokens", 300, "--seq-len", 64)
    code, stdout, err = run(capsys, "-q", *args, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["tokens"] == 300 and result["n_experts"] == 16 and result["top_k"] == 2
    store = TraceStore(out)
    assert store.complete and store.n_tokens == 300 and store.n_sequences == 5  # 64-token sequences
    assert store.meta.extra["capture"]["architecture"] == "qwen3moe"


def test_cli_refuses_bad_model(tmp_path, capsys):
    bad = tmp_path / "m.gguf"
    bad.write_text("not a model")
    out = tmp_path / "o.zarr"
    code, _, err = run(capsys, "capture", "llama", bad, fixture.HELDOUT_DIR, "-o", out)
    assert code == 2 and "GGUF magic" in err and not out.exists()
    code, _, err = run(capsys, "capture", "llama", GGUF, fixture.HELDOUT_DIR, "-o", out, "--override-kv", "x")
    assert code == 2 and "KEY=TYPE:VALUE" in err and not out.exists()


def test_override_top_k(tmp_path, hf_tokens):
    trace = _llama(tmp_path, hf_tokens[:1], "k4.zarr", overrides=["qwen3moe.expert_used_count=int:4"])
    assert trace.top_k == 4
    assert all(len(set(row)) == 4 for row in trace.experts.reshape(-1, 4).tolist())


@pytest.mark.parametrize("spec", ["noequals", "k=int", "k=complex:1", "k=int:x", "k=bool:maybe"])
def test_bad_override(spec):
    with pytest.raises(MoescopeError):
        parse_override(spec)


def _no_experts_gguf(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["missing", "not_gguf", "no_experts"])
def test_bad_model_leaves_nothing(tmp_path, kind):
    model = tmp_path / "m.gguf"
    if kind == "not_gguf":
        model.write_text("not a model")
    elif kind == "no_experts":
        _no_experts_gguf(model)
    out = tmp_path / "out.zarr"
    with pytest.raises(MoescopeError, match=r"m\.gguf"):
        capture_llama(model, [[1, 2, 3]], out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if kind == "missing" else ["m.gguf"])


def test_tapless_session_records_nothing_and_matches_logits(hf_tokens):
    """The overhead benchmark's baseline: same decode, no callback; the tap does not change the logits."""
    from moescope.gguf.runtime import LlamaSession

    ids = hf_tokens[0][:32]
    kw = {"n_ctx": 64, "flash_attn": False, "kv_type": "f32"}
    with (
        LlamaSession(GGUF, inspect_gguf(GGUF), record=True, **kw) as tap,
        LlamaSession(GGUF, inspect_gguf(GGUF), record=False, **kw) as plain,
    ):
        experts, _ = tap.run(ids)
        plain.decode(ids)
        assert experts.shape == (32, 4, 2)
        assert not plain.tap.grabs  # no callback: nothing was asked for or copied
        assert tap.argmax_last() == plain.argmax_last()


@pytest.mark.parametrize(
    ("arch", "groups", "gating", "caveat"),
    [
        ("deepseek2", 8, "softmax", True),  # DeepSeek-V2 / V2.5: group_limited_greedy in the reference
        ("deepseek2", 8, None, True),  # older V2 GGUFs carry no gating key: llama.cpp assumes softmax
        ("deepseek2", 8, "sigmoid", False),  # DeepSeek-V3 / Kimi-K2: the V3 rule is the reference's
        ("deepseek2", 1, "softmax", False),  # V2-Lite: no groups
        ("glm4moe", 8, "sigmoid", False),
        ("phimoe", 0, None, True),  # RMSNorm and softmax weights where the reference has LayerNorm, sparsemixer
    ],
)
def test_routing_caveats(arch, groups, gating, caveat):
    import dataclasses

    from moescope.capture.llama import routing_caveats

    info = dataclasses.replace(inspect_gguf(GGUF), architecture=arch, expert_groups=groups, gating=gating)
    notes = routing_caveats(info)
    assert len(notes) == int(caveat) and all(("best expert" in n) == (arch == "deepseek2") for n in notes)
    assert all("moescope compare" in n for n in notes)
