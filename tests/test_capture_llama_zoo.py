"""The llama.cpp capture's lookahead and candidates on every architecture of the model zoo (`tests/zoo.py`).

Two checks per zoo model, both on the same token ids as `test_zoo.py` (f32 GGUF, exact settings):

- **the rule**: `moescope.gguf.routing` applied to each router's own input (distance 0: ``src[1]`` of
  llama.cpp's ``ffn_moe_logits``, through the layer's router read from the GGUF) reproduces the experts
  llama.cpp chose, on every architecture and quantized row (gating, ``exp_probs_b``, groups, router bias);
- **the engines**: where the two engines route alike (``min_agree >= 0.99``: all but DeepSeek-V2's group rule
  and PhiMoE), the lookahead at d = 1, 2 and the candidates equal the transformers capture's
  (`RouterRecorder`) for >= 99.9% of token-layers (or the spec's ``min_agree`` where it is lower).

Slow: the first run builds and converts the zoo (cached, see `zoo.cache_dir`).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")
tokenizers = pytest.importorskip("tokenizers")

from moescope import fixture  # noqa: E402
from moescope.capture import capture_hf, capture_llama  # noqa: E402
from moescope.gguf import inspect_gguf, routing  # noqa: E402
from moescope.gguf.runtime import LlamaSession  # noqa: E402
from moescope.store import load_trace  # noqa: E402
from zoo import QUANTIZED, ZOO, zoo_model  # noqa: E402

pytestmark = pytest.mark.slow
SEQ_LEN, N_SEQ, LOOKAHEAD = 64, 6, 2


@pytest.fixture(scope="module")
def token_ids() -> list[list[int]]:
    """[N_SEQ] lists of SEQ_LEN ids from every other held-out document (as `test_zoo.py`)."""
    tok = tokenizers.Tokenizer.from_file(str(fixture.MODEL_DIR / "tokenizer.json"))
    texts = [p.read_text(encoding="utf-8") for p in sorted(fixture.HELDOUT_DIR.glob("*/*.txt"))]
    seqs = [ids[:SEQ_LEN] for ids in (tok.encode(t).ids for t in texts[::2]) if len(ids) >= SEQ_LEN]
    return seqs[:N_SEQ]


def same_sets(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """True where the two arrays hold the same set along the last axis."""
    return np.all(np.sort(a, axis=-1) == np.sort(b, axis=-1), axis=-1)


@pytest.mark.parametrize(("name", "outtype"), [(n, "f32") for n in ZOO] + list(QUANTIZED))
def test_rule_reproduces_llama_cpps_choice(name, outtype, token_ids, monkeypatch):
    gguf = zoo_model(name, outtype)[1]
    info = inspect_gguf(gguf)
    own: dict[int, list[np.ndarray]] = {}
    predict = routing.Lookahead.predict

    def spy(self, j, hidden):
        own.setdefault(j, []).append(self.route(j, hidden))
        return predict(self, j, hidden)

    monkeypatch.setattr(routing.Lookahead, "predict", spy)
    kw = {"flash_attn": False, "kv_type": "f32", "lookahead": 1, "router_logits": True}
    with LlamaSession(gguf, info, n_ctx=SEQ_LEN, **kw) as session:
        rows = []
        for ids in token_ids:
            session.clear()
            rows.append(session.run_all(ids))
        rule = session.tap.lookahead.rule
        routers = session.tap.lookahead.routers
    experts = np.concatenate([r[0] for r in rows])
    logits = np.concatenate([r[2]["router_logits"] for r in rows])
    from_hidden = np.stack([np.concatenate(own[j]) for j in range(len(info.layer_ids))], axis=1)
    assert same_sets(from_hidden, experts).all(), same_sets(from_hidden, experts).mean(axis=0)
    k = session.top_k
    from_logits = np.stack(
        [routing.select_experts(logits[:, j], k, rule, r.probs_bias) for j, r in enumerate(routers)], axis=1
    )
    assert same_sets(from_logits, experts).all()


@pytest.mark.parametrize("name", [s.name for s in ZOO.values() if s.min_agree >= 0.99])
def test_lookahead_and_candidates_equal_transformers(name, token_ids, tmp_path):
    hf_dir, gguf = zoo_model(name)
    least = min(0.999, ZOO[name].min_agree)
    m = ZOO[name].top_k + 2
    kw = {"seq_len": SEQ_LEN, "lookahead": LOOKAHEAD, "candidates": m}
    hf = load_trace(capture_hf(hf_dir, None, token_ids, tmp_path / "hf.zarr", **kw))
    ll = load_trace(capture_llama(gguf, token_ids, tmp_path / "ll.zarr", flash_attn=False, kv_type="f32", **kw))
    n_layers = len(ll.layer_ids)
    for d in range(LOOKAHEAD):
        a, b = ll.extras["lookahead"][:, : n_layers - 1 - d, d], hf.extras["lookahead"][:, : n_layers - 1 - d, d]
        assert same_sets(a, b).mean() >= least, (d + 1, same_sets(a, b).mean())
        assert (ll.extras["lookahead"][:, n_layers - 1 - d :, d] == -1).all()
    assert same_sets(ll.extras["candidates"], hf.extras["candidates"]).mean() >= least
    np.testing.assert_allclose(ll.extras["candidate_probs"], hf.extras["candidate_probs"], atol=1e-3)
