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


# -- lookahead and candidates --------------------------------------------------------------------------
LOOKAHEAD = 2
K, N_EXPERTS = 2, 16  # the fixture's top-k and experts
CANDIDATES = K + 2


@pytest.fixture(scope="module")
def hf_extras(hf_tokens, tmp_path_factory):
    """The transformers capture of `hf_tokens` with ``lookahead=2, candidates=k+2`` (the oracle)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from moescope.capture import capture_hf

    out = tmp_path_factory.mktemp("hf") / "hf.zarr"
    capture_hf(fixture.MODEL_DIR, None, hf_tokens, out, seq_len=SEQ_LEN, lookahead=LOOKAHEAD, candidates=CANDIDATES)
    return load_trace(out)


@pytest.fixture(scope="module")
def llama_extras(hf_tokens, tmp_path_factory):
    """The llama.cpp capture of `hf_tokens` in exact mode with ``lookahead=2, candidates=k+2``."""
    out = tmp_path_factory.mktemp("llama") / "llama.zarr"
    kw = {"flash_attn": False, "kv_type": "f32", "lookahead": LOOKAHEAD, "candidates": CANDIDATES}
    capture_llama(GGUF, hf_tokens, out, seq_len=SEQ_LEN, **kw)
    return load_trace(out)


def test_lookahead_and_candidates_equal_transformers(hf_extras, llama_extras):
    hf, ll = hf_extras, llama_extras
    assert ll.extras["lookahead"].shape == (ll.n_tokens, 4, LOOKAHEAD, K) == hf.extras["lookahead"].shape
    assert ll.extras["candidates"].shape == ll.extras["candidate_probs"].shape == (ll.n_tokens, 4, CANDIDATES)
    np.testing.assert_array_equal(ll.token_ids, hf.token_ids)
    for d in range(LOOKAHEAD):  # -1 exactly where layer l + d + 1 is past the last MoE layer
        assert (ll.extras["lookahead"][:, 4 - 1 - d :, d] == -1).all()
        assert (ll.extras["lookahead"][:, : 4 - 1 - d, d] >= 0).all()
        same = _same_sets(ll.extras["lookahead"][:, : 4 - 1 - d, d], hf.extras["lookahead"][:, : 4 - 1 - d, d])
        assert same.mean() >= 0.999, (d + 1, same.mean())
    same = _same_sets(ll.extras["candidates"], hf.extras["candidates"])
    assert same.mean() >= 0.999, same.mean()
    np.testing.assert_allclose(ll.extras["candidate_probs"], hf.extras["candidate_probs"], atol=1e-4)
    # the candidates start with the k chosen experts, best first, and their probabilities descend
    np.testing.assert_array_equal(np.sort(ll.extras["candidates"][..., :K], 2), np.sort(ll.experts, 2))
    assert (np.diff(ll.extras["candidate_probs"], axis=2) <= 0).all()
    capture = ll.meta.extra["capture"]
    assert (capture["lookahead"], capture["candidates"]) == (LOOKAHEAD, CANDIDATES)
    assert capture["lookahead_rule"]["gating"] == "softmax"


def test_lookahead_predicts_the_later_layers_above_chance(llama_extras):
    """Recall of the lookahead at distance d for layer l against what layer l + d then routed."""
    la, experts = llama_extras.extras["lookahead"], llama_extras.experts
    chance = K / N_EXPERTS
    for d in range(1, LOOKAHEAD + 1):
        for j in range(4 - d):
            recall = (la[:, j, d - 1, :, None] == experts[:, j + d, None, :]).any(-1).mean()
            assert recall > 2 * chance, (j, d, recall)


def test_lookahead_at_distance_zero_is_llama_cpps_own_choice(hf_tokens, monkeypatch):
    """The router input read from ``src[1]`` of ffn_moe_logits, through the layer's own router read from the
    GGUF and `select_experts`, gives exactly the experts llama.cpp chose: the tap reads the right tensor."""
    from moescope.gguf import routing
    from moescope.gguf.runtime import LlamaSession

    own: dict[int, list] = {}
    predict = routing.Lookahead.predict

    def spy(self, j, hidden):
        own.setdefault(j, []).append(self.route(j, hidden))
        return predict(self, j, hidden)

    monkeypatch.setattr(routing.Lookahead, "predict", spy)
    with LlamaSession(GGUF, inspect_gguf(GGUF), n_ctx=SEQ_LEN, flash_attn=False, kv_type="f32", lookahead=1) as s:
        experts, _, extras = s.run_all(hf_tokens[0])
    assert extras["lookahead"].shape == (len(hf_tokens[0]), 4, 1, K)
    routed = np.stack([np.concatenate(own[j]) for j in range(4)], axis=1)
    assert _same_sets(routed, experts).all()


def test_lookahead_in_decode_mode(tmp_path, hf_tokens):
    kw = {"mode": "decode", "generate": 3, "prompt_len": 8, "ignore_eos": True, "lookahead": 3, "candidates": 3}
    trace = _llama(tmp_path, hf_tokens[:2], "dec.zarr", **kw)
    assert trace.n_tokens == 6 and trace.extras["lookahead"].shape == (6, 4, 3, K)
    assert (trace.extras["lookahead"][:, 3] == -1).all() and (trace.extras["lookahead"][:, 0] >= 0).all()
    np.testing.assert_array_equal(np.sort(trace.extras["candidates"][..., :K], 2), np.sort(trace.experts, 2))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--lookahead", "4"), "--lookahead"),
        (("--candidates", "2"), "--candidates 2: expected more than top-k (2)"),
        (("--candidates", "17"), "at most the 16 experts"),
    ],
)
def test_cli_refuses_bad_lookahead_and_candidates(tmp_path, capsys, args, message):
    out = tmp_path / "o.zarr"
    code, _, err = run(capsys, "capture", "llama", GGUF, fixture.HELDOUT_DIR, "-o", out, *args)
    assert code == 2 and message in err and not out.exists()


def test_cli_records_lookahead(tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    args = ("capture", "llama", GGUF, fixture.HELDOUT_DIR, "-o", out, "--max-tokens", 100, "--seq-len", 50)
    code, _, err = run(capsys, "-q", *args, "--lookahead", 1, "--candidates", 5)
    assert code == 0, err
    trace = load_trace(out)
    assert trace.extras["lookahead"].shape == (100, 4, 1, K) and trace.extras["candidates"].shape == (100, 4, 5)


def _moe_gguf(path, arch, *, gating=None, groups=0, n_experts=8, n_embd=4):
    """A GGUF with the keys, router and expert tensors `inspect_gguf` and `routing_rule` read (no model to run)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_expert_count(n_experts)
    w.add_expert_used_count(2)
    if gating is not None:
        w.add_uint32(f"{arch}.expert_gating_func", gating)
    if groups:
        w.add_uint32(f"{arch}.expert_group_count", groups)
        w.add_uint32(f"{arch}.expert_group_used_count", 2)
    for layer in range(2):
        w.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", np.ones((n_experts, n_embd), dtype=np.float32))
        for part in ("gate", "up", "down"):  # inspect_gguf refuses a router without stacked experts
            w.add_tensor(f"blk.{layer}.ffn_{part}_exps.weight", np.zeros((n_experts, 4, n_embd), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    ("arch", "gating", "want"),
    [
        ("qwen3moe", 2, "softmax"),  # qwen3moe.cpp passes softmax whatever the key says
        ("deepseek2", None, "softmax"),  # V2 GGUFs carry no key: llama.cpp assumes softmax
        ("deepseek2", 2, "sigmoid"),
        ("glm4moe", None, "sigmoid"),
        ("deepseek2", 3, "softmax_weight"),
        ("gpt-oss", None, "softmax_weight"),
    ],
)
def test_routing_rule_reads_the_gating(tmp_path, arch, gating, want):
    from moescope.gguf.routing import routing_rule

    rule = routing_rule(inspect_gguf(_moe_gguf(tmp_path / "m.gguf", arch, gating=gating, groups=4)))
    assert (rule.gating, rule.groups, rule.groups_used) == (want, 4, 2)


@pytest.mark.parametrize(("arch", "gating"), [("llama4", 1), ("grovemoe", 1), ("dots1", None), ("deepseek2", 9)])
def test_unknown_rule_is_refused_before_anything_runs(tmp_path, arch, gating):
    """An architecture (or gating) whose selection rule moescope has not checked: a UsageError naming it,
    before llama.cpp loads the model, and no store."""
    from moescope.errors import UsageError

    model = _moe_gguf(tmp_path / "m.gguf", arch, gating=gating)
    out = tmp_path / "out.zarr"
    with pytest.raises(UsageError, match=arch):
        capture_llama(model, [[1, 2, 3]], out, lookahead=1)
    assert not out.exists()


def _naive_select(logits, k, gating, probs_bias, groups, groups_used):
    """build_moe_ffn's selection token by token, in plain Python."""
    out = []
    for row in logits.astype(np.float64):
        if gating == "sigmoid":
            probs = [1 / (1 + np.exp(-x)) for x in row]
        elif gating == "softmax":
            probs = [np.exp(x - row.max()) / np.exp(row - row.max()).sum() for x in row]
        else:
            probs = list(row)
        scores = [p + (0.0 if probs_bias is None else probs_bias[i]) for i, p in enumerate(probs)]
        if groups > 1:
            size = len(scores) // groups
            group_score = [sum(sorted(scores[g * size : (g + 1) * size])[-2:]) for g in range(groups)]
            kept = sorted(range(groups), key=lambda g: -group_score[g])[:groups_used]
            scores = [s if i // size in kept else -np.inf for i, s in enumerate(scores)]
        out.append(sorted(range(len(scores)), key=lambda i: -scores[i])[:k])
    return np.array(out)


@pytest.mark.parametrize(
    ("gating", "bias", "groups"),
    [("sigmoid", True, 8), ("sigmoid", True, 0), ("softmax", False, 4), ("softmax_weight", False, 0)],
)
def test_select_experts_matches_naive(gating, bias, groups):
    from moescope.gguf.routing import RoutingRule, select_experts

    rng = np.random.default_rng(7)
    n_experts, k, used = 64, 6, 3
    logits = rng.normal(size=(300, n_experts)).astype(np.float32)
    probs_bias = rng.normal(scale=0.5, size=n_experts).astype(np.float32) if bias else None
    rule = RoutingRule(gating, groups, used if groups else 0)
    got = select_experts(logits, k, rule, probs_bias)
    want = _naive_select(logits, k, gating, None if probs_bias is None else probs_bias.tolist(), groups, used)
    np.testing.assert_array_equal(np.sort(got, 1), np.sort(want, 1))
    if groups:  # every token's experts lie in at most groups_used groups, not all in the best-scoring experts
        assert max(len(set(row)) for row in (got // (n_experts // groups)).tolist()) <= used
        assert (np.sort(got, 1) != np.sort(np.argsort(-logits, 1)[:, :k], 1)).any()
