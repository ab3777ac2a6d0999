"""Capture from transformers: hooks record what every listed MoE architecture really routed.

Tiny random models are built from configs (no downloads). Where recomputing top-k from the router logits
is valid (softmax top-k routers), the hooks must equal it exactly; for DeepSeek-V3 (bias + groups) they
must not. The CLI runs on a tiny saved Qwen3-MoE model with a tokenizer trained in the test.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import run  # noqa: E402
from moescope.capture import ROUTER_FORMATS, CaptureError, RouterRecorder, capture_hf  # noqa: E402
from moescope.corpus import Document  # noqa: E402
from moescope.imports import read_input  # noqa: E402
from moescope.store import TraceStore  # noqa: E402

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MLA = dict(
    n_routed_experts=8,
    moe_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
)
# per architecture: config overrides (8 experts, top-2) and the MoE layer ids they give
ARCHS = {
    "qwen2_moe": (dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32), [0, 1]),
    "qwen3_moe": (dict(num_experts=8, moe_intermediate_size=32, head_dim=8), [0, 1]),
    "olmoe": (dict(num_experts=8), [0, 1]),
    "mixtral": (dict(num_local_experts=8), [0, 1]),
    "deepseek_v2": (dict(_MLA, q_lora_rank=None, n_group=1, topk_group=1), [1]),
    "deepseek_v3": (dict(_MLA, q_lora_rank=16, n_group=2, topk_group=1), [1]),
    "gpt_oss": (dict(num_local_experts=8, head_dim=8, sliding_window=16), [0, 1]),
    "granitemoe": (dict(num_local_experts=8), [0, 1]),
    "phimoe": (dict(num_local_experts=8), [0, 1]),
}
SOFTMAX_TOPK = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral")  # where top-k of the logits is what the model does


def tiny(arch: str, seed: int = 0, **over):
    cfg = transformers.AutoConfig.for_model(arch, **{**COMMON, "num_experts_per_tok": 2, **ARCHS[arch][0], **over})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def batch(seed: int = 0, lengths=(7, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def record(model, ids, mask, **kw):
    with RouterRecorder(model) as rec, torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, **kw)
        experts, weights = rec.collect(mask)
    return rec, out, experts, weights


def test_table_covers_every_tested_architecture():
    assert {f.arch for f in ROUTER_FORMATS.values()} == set(ARCHS)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_routers_found_and_ids_valid(arch):
    model = tiny(arch)
    ids, mask = batch()
    rec, _, experts, weights = record(model, ids, mask)
    assert rec.layer_ids == ARCHS[arch][1] and rec.n_experts == 8 and rec.top_k == 2
    assert rec.router_classes == [next(k for k, f in ROUTER_FORMATS.items() if f.arch == arch)]
    assert experts.shape == weights.shape == (int(mask.sum()), len(ARCHS[arch][1]), 2)
    assert experts.min() >= 0 and experts.max() < 8 and np.all(experts[..., 0] != experts[..., 1])
    assert np.all(np.isfinite(weights)) and np.all(weights >= 0)


@pytest.mark.parametrize("arch", SOFTMAX_TOPK)
def test_hooks_equal_softmax_topk_of_router_logits(arch):
    model = tiny(arch, seed=1)
    ids, mask = batch(seed=1)
    _, out, experts, weights = record(model, ids, mask, output_router_logits=True)
    keep = mask.reshape(-1).bool()
    normalise = arch == "mixtral" or model.config.norm_topk_prob
    for layer, logits in enumerate(out.router_logits):
        probs = torch.softmax(logits[keep].float(), dim=-1)
        top_w, top_i = torch.topk(probs, 2, dim=-1)
        if normalise:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        got = np.sort(experts[:, layer], axis=1)
        order = np.argsort(top_i.numpy(), axis=1)
        np.testing.assert_array_equal(got, np.take_along_axis(top_i.numpy(), order, axis=1))
        got_w = np.take_along_axis(weights[:, layer], np.argsort(experts[:, layer], axis=1), axis=1)
        np.testing.assert_allclose(got_w, np.take_along_axis(top_w.numpy(), order, axis=1), rtol=1e-5, atol=1e-6)


def test_deepseek_v3_bias_and_groups_differ_from_a_naive_topk():
    model = tiny("deepseek_v3")
    for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias[:] = torch.tensor([0, 0, 0, 0, 0, 0, 50.0, 50.0])
    ids, mask = batch()
    _, out, experts, _ = record(model, ids, mask, output_router_logits=True)
    naive = torch.topk(out.router_logits[0][mask.reshape(-1).bool()], 2, dim=-1).indices.numpy()
    assert np.all(np.sort(experts[:, 0], axis=1) == [6, 7])  # what the model used: the biased experts
    assert np.any(np.sort(naive, axis=1) != [6, 7])  # what a top-k of the logits would claim


def test_dense_layers_absent_from_layer_ids():
    assert RouterRecorder(tiny("qwen2_moe", num_hidden_layers=3, mlp_only_layers=[1])).layer_ids == [0, 2]
    assert RouterRecorder(tiny("qwen2_moe", num_hidden_layers=4, decoder_sparse_step=2)).layer_ids == [1, 3]
    assert RouterRecorder(tiny("deepseek_v2", num_hidden_layers=3)).layer_ids == [1, 2]


def test_not_moe_model_is_refused():
    cfg = transformers.LlamaConfig(**{k: v for k, v in COMMON.items()})
    with pytest.raises(CaptureError, match="LlamaForCausalLM has no Mixture-of-Experts router"):
        RouterRecorder(transformers.LlamaForCausalLM(cfg))


class _ToyRouter(torch.nn.Module):
    def __init__(self, returns: str):
        super().__init__()
        self.weight, self.returns = torch.nn.Parameter(torch.randn(8, 4)), returns

    def forward(self, x):
        logits = x @ self.weight.T
        w, i = torch.topk(logits.softmax(-1), 2)
        return logits if self.returns == "logits" else (logits, i.to(torch.int32), w)


class _ToyModel(torch.nn.Module):
    """A non-transformers MoE-shaped model: layers.N.moe.{router, experts}."""

    def __init__(self, returns: str):
        super().__init__()
        self.config = types.SimpleNamespace(num_experts=8, num_experts_per_tok=2)
        blocks = [torch.nn.ModuleDict({"router": _ToyRouter(returns), "experts": torch.nn.Identity()}) for _ in "ab"]
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"moe": b}) for b in blocks])

    def forward(self, x):
        for layer in self.layers:
            layer["moe"]["router"](x)


def test_unknown_router_found_from_output_shapes_or_refused():
    torch.manual_seed(0)
    model, x = _ToyModel("tuple"), torch.randn(5, 4)
    with RouterRecorder(model) as rec:
        model(x)
        experts, weights = rec.collect()
    expect = [
        torch.topk((x @ r.weight.T).softmax(-1), 2) for r in (model.layers[0].moe.router, model.layers[1].moe.router)
    ]
    np.testing.assert_array_equal(experts, np.stack([e.indices.numpy() for e in expect], axis=1))
    np.testing.assert_allclose(weights, np.stack([e.values.detach().numpy() for e in expect], axis=1))
    with RouterRecorder(_ToyModel("logits")) as rec, pytest.raises(CaptureError, match=r"_ToyRouter\) returned"):
        rec.model(x)


# -- capture_hf and the CLI on a saved tiny model ------------------------------------------------------
SENTENCES = [
    "The court held that the contract was void for lack of consideration.",
    "def add(a, b):\n    return a + b  # a small function",
    "Mixture-of-experts models route every token to a few experts per layer.",
    "The weather today is sunny with a light breeze from the west.",
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Qwen3-MoE folder, a dense Llama folder (both with a tokenizer), and a tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    tok = _tokenizer()
    moe = tiny("qwen3_moe", vocab_size=len(tok), num_hidden_layers=3)
    moe.save_pretrained(root / "moe")
    tok.save_pretrained(root / "moe")
    cfg = transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tok)})
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    return types.SimpleNamespace(moe=root / "moe", dense=root / "dense", tokenizer=tok, model=moe)


@pytest.fixture
def corpus(tmp_path):
    for label, texts in (("law", SENTENCES[:1] * 3), ("code", SENTENCES[1:2] * 2)):
        (tmp_path / "corpus" / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            (tmp_path / "corpus" / label / f"{i}.txt").write_text(text * (i + 1), encoding="utf-8")
    return tmp_path / "corpus"


def test_cli_prefill_reads_back(capsys, saved, corpus, tmp_path):
    out = tmp_path / "run.zarr"
    code, stdout, err = run(capsys, "-q", "capture", "hf", saved.moe, corpus, "-o", out, "--seq-len", "16", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    tok = saved.tokenizer
    lengths = [len(tok(p.read_text())["input_ids"]) for p in sorted(corpus.rglob("*.txt"))]
    trace = read_input(out)
    assert summary["tokens"] == trace.n_tokens == sum(lengths) and summary["layers"] == 3
    assert trace.n_sequences == sum(-(-n // 16) for n in lengths) and trace.seq_lengths.max() == 16
    assert trace.labels() == ["code", "law"] and trace.phase == "prefill" and trace.layer_ids.tolist() == [0, 1, 2]
    ids = [tok(p.read_text())["input_ids"] for p in sorted(corpus.rglob("*.txt"), key=lambda p: str(p))]
    want = [i for doc in ids for lo in range(0, len(doc), 16) for i in doc[lo : lo + 16]]
    assert sorted(trace.token_ids.tolist()) == sorted(want)  # every token's id, as run (batches of sequences)
    meta = trace.meta.to_dict()
    assert meta["model"] == str(saved.moe) and meta["source"].startswith("transformers ") and meta["corpus"]
    assert meta["capture"]["mode"] == "prefill" and meta["capture"]["dtype"] == "float32"
    assert TraceStore(out).complete
    code, stdout, _ = run(capsys, "capture", "hf", saved.moe, corpus, "-o", out, "--max-tokens", "20", "--overwrite")
    assert code == 0 and "tokens/s" in stdout and read_input(out).n_tokens == 20


def test_cli_decode_records_generated_tokens_only(capsys, saved, corpus, tmp_path):
    out = tmp_path / "dec.zarr"
    args = ("capture", "hf", saved.moe, corpus, "-o", out, "--generate", "3", "--prompt-len", "5", "--ignore-eos")
    assert run(capsys, "-q", *args)[0] == 0
    trace = read_input(out)
    assert trace.phase == "decode" and trace.n_sequences == 5 and trace.seq_lengths.tolist() == [3] * 5


def test_decode_routing_equals_teacher_forced_routing(saved, tmp_path):
    model, tok = saved.model, saved.tokenizer
    doc = Document(SENTENCES[2], "x", "mem")
    path = capture_hf(model, tok, [doc], tmp_path / "d.zarr", mode="decode", generate=4, prompt_len=6, ignore_eos=True)
    decoded = read_input(path)
    prompt = torch.tensor([tok(doc.text)["input_ids"][:6]])
    with torch.inference_mode():
        full = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with RouterRecorder(model) as rec, torch.inference_mode():
        model(full)
        experts, _ = rec.collect()
    np.testing.assert_array_equal(np.sort(decoded.experts, axis=2), np.sort(experts[-4:], axis=2))
    # each step's token id is the generated token that step fed and routed
    assert decoded.token_ids.tolist() == full[0, -4:].tolist()


def test_sanity_violation_surfaces_and_store_stays_incomplete(saved, tmp_path):
    def duplicate(module, args, output):
        ids = output[2].clone()
        ids[:, 1] = ids[:, 0]
        return output[0], output[1], ids

    gate = saved.model.model.layers[0].mlp.gate
    handle = gate.register_forward_hook(duplicate)
    try:
        with pytest.raises(CaptureError, match=r"failed the sanity check.*twice"):
            capture_hf(saved.model, saved.tokenizer, [Document("some text here", "x", "m")], tmp_path / "bad.zarr")
    finally:
        handle.remove()
    store = TraceStore(tmp_path / "bad.zarr")
    assert not store.complete and store.n_tokens == 0


@pytest.mark.parametrize("case", ["missing-model", "dense-model", "empty-corpus", "undecodable", "bad-dtype"])
def test_cli_bad_inputs_exit_2_and_leave_nothing(capsys, saved, corpus, tmp_path, case):
    model, data, extra = saved.moe, corpus, []
    if case == "missing-model":
        model = tmp_path / "no-such-model"
    elif case == "dense-model":
        model = saved.dense
    elif case == "empty-corpus":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "undecodable":
        (corpus / "law" / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    else:
        extra = ["--dtype", "float64"]
    out = tmp_path / "out.zarr"
    code, stdout, err = run(capsys, "capture", "hf", model, data, "-o", out, *extra)
    assert code == 2 and stdout == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.zarr")]
    if case == "dense-model":
        assert "LlamaForCausalLM has no Mixture-of-Experts router" in err


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lookahead_applies_the_next_routers_to_this_routers_input(arch):
    """Lookahead at distance d from MoE layer i = what router i+d chooses from router i's input (its own
    module: bias, groups, renormalisation exact); -1 past the last layer. Candidates: the top-M logits."""
    model = tiny(arch, num_hidden_layers=4)
    ids, mask = batch()
    rec = RouterRecorder(model, lookahead=2, candidates=4)
    mods = [dict(model.named_modules())[s.name] for s in rec.sites]
    inputs = {}

    def keep_input(i):
        def hook(module, args):
            if not rec._ahead:  # not the lookahead's own calls
                inputs[i] = args[0].detach().clone()

        return hook

    hooks = [m.register_forward_pre_hook(keep_input(i)) for i, m in enumerate(mods)]
    with rec, torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
        experts, _, extras = rec.collect_all(mask)
    for h in hooks:
        h.remove()
    keep = mask.reshape(-1).bool()
    la = extras["lookahead"]
    assert la.shape == (*experts.shape[:2], 2, 2) and rec.extra_shapes()["lookahead"] == (rec.n_layers, 2, 2)
    fmt = ROUTER_FORMATS[rec.router_classes[0]]
    for i in range(rec.n_layers):
        for d in (1, 2):
            if i + d >= rec.n_layers:
                assert (la[:, i, d - 1] == -1).all()
                continue
            with torch.inference_mode():
                want = mods[i + d](inputs[i])[fmt.ids_at].reshape(-1, 2)[keep].numpy()
            np.testing.assert_array_equal(np.sort(la[:, i, d - 1], axis=1), np.sort(want, axis=1))
    cand, prob = extras["candidates"], extras["candidate_probs"]
    assert cand.shape == prob.shape == (*experts.shape[:2], 4)
    assert np.all(np.diff(prob, axis=2) <= 1e-7) and np.all(prob.sum(axis=2) <= 1 + 1e-5)
    if arch in SOFTMAX_TOPK:  # the chosen experts are the top-k logits
        np.testing.assert_array_equal(np.sort(cand[..., :2], axis=2), np.sort(experts, axis=2))


def test_lookahead_and_candidates_reach_the_store(capsys, saved, corpus, tmp_path):
    out = tmp_path / "la.zarr"
    args = ("capture", "hf", saved.moe, corpus, "-o", out, "--seq-len", "16", "--lookahead", "2", "--candidates", "4")
    code, _, err = run(capsys, "-q", *args)
    assert code == 0, err
    trace = read_input(out)
    assert trace.extras["lookahead"].shape == (trace.n_tokens, 3, 2, 2)
    assert trace.extras["candidates"].shape == (trace.n_tokens, 3, 4) and trace.token_ids is not None
    assert (trace.extras["lookahead"][:, 2] == -1).all() and (trace.extras["lookahead"][:, 1, 1] == -1).all()
    assert trace.meta.extra["capture"]["lookahead"] == 2
    code, _, err = run(capsys, "capture", "hf", saved.moe, corpus, "-o", tmp_path / "x.zarr", "--candidates", "2")
    assert code == 2 and "--candidates 2: expected more than top-k (2)" in err
    code, _, err = run(capsys, "capture", "hf", saved.moe, corpus, "-o", tmp_path / "x.zarr", "--lookahead", "4")
    assert code == 2 and not (tmp_path / "x.zarr").exists()


def test_cli_lookahead_bound_is_the_recorders():
    """`--lookahead`'s CLI bound repeats `MAX_LOOKAHEAD` (the CLI does not import the capture package)."""
    from moescope.capture.routers import MAX_LOOKAHEAD
    from moescope.cli.capture_cmds import LookaheadOpt

    assert LookaheadOpt.__metadata__[0].max == MAX_LOOKAHEAD
