"""The model zoo in both engines: every architecture of `zoo.ZOO` routes the same tokens alike in
transformers and in llama.cpp (after llama.cpp's own converter), or as far apart as its spec documents.

Each zoo model is built from a real MoE configuration scaled down (`tests/zoo.py`), converted once per
cache, and run on the same token ids (``N_SEQ`` x ``SEQ_LEN`` cut from the fixture's held-out text): the
transformers capture (`RouterRecorder`) and the llama.cpp capture (``flash_attn=False``, f32 KV cache) must
choose the same expert set for every token in every MoE layer where the engines compute the same routing,
and report the same MoE layers (leading dense layers and MTP blocks absent). The command-line chain on every
zoo model, quantized rows included, is `test_zoo_chain.py`. Slow: the first run builds and converts the zoo.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")
tokenizers = pytest.importorskip("tokenizers")

from conftest import routing_with_logits  # noqa: E402
from moescope import fixture  # noqa: E402
from moescope.capture import capture_llama, load_hf_model  # noqa: E402
from moescope.gguf import inspect_gguf  # noqa: E402
from moescope.gguf.inspect import field, open_gguf  # noqa: E402
from moescope.store import load_trace  # noqa: E402
from zoo import ZOO, zoo_model  # noqa: E402

pytestmark = pytest.mark.slow
SEQ_LEN, N_SEQ = 64, 6


@dataclasses.dataclass
class Routing:
    """One capture. experts: [tokens, layers, k]; logits: [tokens, layers, experts] (transformers only)."""

    experts: np.ndarray
    layer_ids: list[int]
    logits: np.ndarray | None = None


@pytest.fixture(scope="module")
def token_ids() -> list[list[int]]:
    """[N_SEQ] lists of SEQ_LEN ids: the start of every other held-out document (code, i18n, man, numbers),
    with the fixture's tokenizer."""
    tok = tokenizers.Tokenizer.from_file(str(fixture.MODEL_DIR / "tokenizer.json"))
    texts = [p.read_text(encoding="utf-8") for p in sorted(fixture.HELDOUT_DIR.glob("*/*.txt"))]
    seqs = [ids[:SEQ_LEN] for ids in (tok.encode(t).ids for t in texts[::2]) if len(ids) >= SEQ_LEN]
    assert len(seqs) >= N_SEQ
    return seqs[:N_SEQ]


def hf_routing(hf_folder, ids, zero_bias: bool = False) -> Routing:
    """The transformers capture of `ids` (one batch), with each router's logits; `zero_bias` zeroes every
    ``e_score_correction_bias`` first."""
    model = load_hf_model(hf_folder)
    if zero_bias:
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()
    experts, _, logits, layer_ids = routing_with_logits(model, [ids])
    return Routing(experts, layer_ids, logits)


@pytest.fixture(scope="module")
def routing(token_ids, tmp_path_factory):
    """get(name, engine, outtype="f32") -> `Routing`, each capture run once per module."""
    memo: dict[tuple, Routing] = {}

    def get(name: str, engine: str, outtype: str = "f32") -> Routing:
        key = (name, engine, outtype if engine == "llama" else "f32")
        if key not in memo:
            hf, gguf = zoo_model(name, key[2])
            if engine == "hf":
                memo[key] = hf_routing(hf, token_ids)
            else:
                out = tmp_path_factory.mktemp("zoo") / f"{name}-{outtype}.zarr"
                capture_llama(gguf, token_ids, out, seq_len=SEQ_LEN, flash_attn=False, kv_type="f32")
                trace = load_trace(out)
                memo[key] = Routing(trace.experts, trace.layer_ids.tolist())
        return memo[key]

    return get


def same_sets(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[tokens, layers] True where the two captures chose the same set of experts."""
    return np.all(np.sort(a, axis=2) == np.sort(b, axis=2), axis=2)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of the k experts two captures have in common, over tokens and layers."""
    hits = (a[..., :, None] == b[..., None, :]).any(axis=-1)
    return float(hits.mean())


@pytest.mark.parametrize("name", ZOO)
def test_engines_route_alike(name, routing):
    """Same MoE layers, non-degenerate routing, and the same expert sets (or the spec's documented share)."""
    spec = ZOO[name]
    hf, ll = routing(name, "hf"), routing(name, "llama")
    assert hf.layer_ids == ll.layer_ids == spec.moe_layers  # dense and MTP blocks are not routed layers
    assert ll.experts.shape == hf.experts.shape == (N_SEQ * SEQ_LEN, len(spec.moe_layers), spec.top_k)
    distinct = [len(np.unique(hf.experts[:, j])) for j in range(len(hf.layer_ids))]
    assert min(distinct) >= spec.n_experts // 4, f"degenerate routing: {distinct} of {spec.n_experts} experts used"
    same = same_sets(hf.experts, ll.experts)
    if spec.min_agree == 1.0:
        assert same.all(), f"{(~same).sum()} of {same.size} token-layers differ, per layer {same.mean(0)}"
    else:
        assert same.mean() >= spec.min_agree, f"identical-set share {same.mean():.4f} ({spec.notes})"


@pytest.mark.parametrize("name", [s.name for s in ZOO.values() if s.mtp])
def test_mtp_blocks_reach_the_gguf(name):
    """The converter keeps the checkpoint's MTP block; moescope lists it apart from the routed layers."""
    spec = ZOO[name]
    gguf = zoo_model(name)[1]
    n = spec.config["num_hidden_layers"]
    reader = open_gguf(gguf)
    arch = field(reader, "general.architecture")
    assert field(reader, f"{arch}.nextn_predict_layers") == spec.mtp
    assert field(reader, f"{arch}.block_count") == n + spec.mtp
    names = {t.name for t in reader.tensors}
    assert {f"blk.{n}.nextn.eh_proj.weight", f"blk.{n}.ffn_gate_inp.weight"} <= names
    info = inspect_gguf(gguf)
    assert info.mtp_blocks == tuple(range(n, n + spec.mtp)) and list(info.layer_ids) == spec.moe_layers


@pytest.mark.parametrize("name", [s.name for s in ZOO.values() if s.score_bias])
def test_score_correction_bias_changes_the_choice(name, routing, token_ids):
    """The zoo's e_score_correction_bias is large enough to matter, so the engines' agreement tests it."""
    unbiased = hf_routing(zoo_model(name)[0], token_ids, zero_bias=True)
    assert same_sets(routing(name, "hf").experts, unbiased.experts).mean() < 0.5  # measured 0.000 / 0.001


def _group_limited(probs: np.ndarray, n_group: int, topk_group: int, k: int, group_score) -> np.ndarray:
    """[tokens, k] experts: the top-k of `probs` [tokens, experts] within the `topk_group` groups ranked
    highest by ``group_score(probs of a group [tokens, groups, per_group]) -> [tokens, groups]``."""
    t, e = probs.shape
    ranked = np.argsort(-group_score(probs.reshape(t, n_group, e // n_group)), axis=1, kind="stable")
    keep = np.zeros((t, n_group), dtype=bool)
    np.put_along_axis(keep, ranked[:, :topk_group], True, axis=1)
    masked = np.where(np.repeat(keep, e // n_group, axis=1), probs, -np.inf)
    return np.argsort(-masked, axis=1, kind="stable")[:, :k]


def test_deepseek_v2_group_rule_is_the_difference(routing):
    """DeepSeek-V2's group_limited_greedy ranks groups by their best expert (transformers); llama.cpp ranks
    them by the sum of their two best (DeepSeek-V3's rule). Each engine follows its rule on transformers'
    router logits: transformers in every layer, llama.cpp in the first MoE layer (the later ones see other
    hidden states once an earlier layer chose other experts)."""
    c = ZOO["dsv2grouped"].config
    hf, ll = routing("dsv2grouped", "hf"), routing("dsv2grouped", "llama")
    probs = torch.from_numpy(hf.logits).softmax(-1).numpy()

    def chosen(layer: int, group_score) -> np.ndarray:
        return _group_limited(probs[:, layer], c["n_group"], c["topk_group"], c["num_experts_per_tok"], group_score)

    by_max = np.stack([chosen(j, lambda g: g.max(axis=2)) for j in range(len(hf.layer_ids))], axis=1)
    assert same_sets(by_max, hf.experts).all()
    by_top2 = chosen(0, lambda g: np.sort(g, axis=2)[..., -2:].sum(axis=2))
    assert same_sets(by_top2[:, None], ll.experts[:, :1]).all()
    assert not same_sets(by_max[:, :1], ll.experts[:, :1]).all()
