"""llama.cpp's expert selection (``build_moe_ffn`` in ``src/llama-graph.cpp``) redone in numpy, per GGUF
architecture, and the lookahead predictor built on it: the routers of later MoE layers, read from the GGUF,
applied to the hidden state entering an earlier router.

What ``build_moe_ffn`` does from a router's input ``x`` (``[n_embd]`` per token), in order:

1. ``logits = W x`` (``blk.N.ffn_gate_inp.weight``), ``+ b`` where the architecture passes the router bias
   ``blk.N.ffn_gate_inp.bias`` (gpt-oss);
2. ``probs = gate(logits)``: softmax, sigmoid, none (``softmax_weight``: gpt-oss selects on the logits and
   softmaxes the k chosen ones) or sqrt(softplus);
3. ``+ blk.N.exp_probs_b.bias`` for the selection only (DeepSeek-V3, GLM-4.5, dots.llm1);
4. with ``{arch}.expert_group_count`` G > 1: a group's score is the sum of its two best experts, the best
   ``{arch}.expert_group_used_count`` groups are kept and the others masked out;
5. the top-k experts.

Which gating and biases an architecture uses is decided in its ``src/models/<arch>.cpp``, not in the GGUF
alone, so the architectures are a registry, `ARCH_ROUTING`, each entry checked against that source; an
architecture outside it (or one whose rule is not the one above: llama4, grovemoe, hash-routed layers)
raises `UsageError` rather than predicting with a wrong rule. Not done here: running the model (see
`moescope.gguf.runtime`), the gate weights of the chosen experts (norm, scale), quantised matmuls (router
weights are dequantised to float32; llama.cpp keeps ``ffn_gate_inp`` in f32 when it quantises a model).

    >>> look = Lookahead(inspect_gguf(path), top_k=8, distance=2)
    >>> look.predict(0, hidden)         # [tokens, 2, 8]: what MoE layers 1 and 2 choose from layer 0's input
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moescope.errors import FormatError, UsageError
from moescope.gguf.inspect import GGUFModel, field, open_gguf

# llama.cpp's llama_expert_gating_func_type (src/llama-hparams.h), the values of {arch}.expert_gating_func
GATING_IDS = {1: "softmax", 2: "sigmoid", 3: "softmax_weight", 4: "sqrtsoftplus"}
GATINGS = tuple(GATING_IDS.values())
ROUTER_WEIGHT = "blk.{layer}.ffn_gate_inp.weight"
ROUTER_BIAS = "blk.{layer}.ffn_gate_inp.bias"
PROBS_BIAS = "blk.{layer}.exp_probs_b.bias"


@dataclasses.dataclass(frozen=True)
class ArchRouting:
    """How llama.cpp routes one GGUF architecture: the arguments its ``src/models/*.cpp`` gives
    ``build_moe_ffn``.

    gating : the gating it passes (a `GATINGS` name), or None when it passes ``hparams.expert_gating_func``
        (the GGUF's ``{arch}.expert_gating_func``); default_gating : then, the gating llama.cpp assumes when
        the key is absent (None: it has no default and the GGUF must say); gate_bias : it passes
        ``ffn_gate_inp.bias``; probs_bias : it passes ``exp_probs_b.bias`` (used where the GGUF has it);
        source : the llama.cpp file that shows it.
    """

    gating: str | None
    source: str
    default_gating: str | None = None
    gate_bias: bool = False
    probs_bias: bool = False


def _softmax_arch(source: str) -> ArchRouting:
    return ArchRouting("softmax", source)


# Checked against the source of llama-cpp-python 0.3.36's vendor/llama.cpp; the first block is also checked
# by running (tests/test_capture_llama_zoo.py: the rule reproduces llama.cpp's own choice on every zoo model).
# Expert groups apply to every architecture (llama-model.cpp reads expert_group_count for all of them).
ARCH_ROUTING: dict[str, ArchRouting] = {
    "llama": _softmax_arch("src/models/llama.cpp"),  # Mixtral
    "qwen2moe": _softmax_arch("src/models/qwen2moe.cpp"),
    "qwen3moe": _softmax_arch("src/models/qwen3moe.cpp"),
    "qwen3next": _softmax_arch("src/models/qwen3next.cpp"),
    "olmoe": _softmax_arch("src/models/olmoe.cpp"),
    "granitemoe": _softmax_arch("src/models/granite.cpp"),
    "phimoe": _softmax_arch("src/models/phi3.cpp"),
    "gpt-oss": ArchRouting("softmax_weight", "src/models/openai-moe.cpp", gate_bias=True),
    "deepseek2": ArchRouting(None, "src/models/deepseek2.cpp", default_gating="softmax", probs_bias=True),
    "glm4moe": ArchRouting(None, "src/models/glm4-moe.cpp", default_gating="sigmoid", probs_bias=True),
    # from the source only
    "qwen3vlmoe": _softmax_arch("src/models/qwen3vlmoe.cpp"),
    "qwen35moe": _softmax_arch("src/models/qwen35moe.cpp"),
    "hunyuan-moe": _softmax_arch("src/models/hunyuan-moe.cpp"),
    "ernie4_5-moe": ArchRouting("softmax", "src/models/ernie4-5-moe.cpp", probs_bias=True),
    "dots1": ArchRouting(None, "src/models/dots1.cpp", probs_bias=True),
    "bailingmoe2": ArchRouting(None, "src/models/bailingmoe2.cpp", probs_bias=True),
    "minimax-m2": ArchRouting(None, "src/models/minimax-m2.cpp", probs_bias=True),
}


@dataclasses.dataclass(frozen=True)
class RoutingRule:
    """One GGUF's selection rule, resolved: gating (a `GATINGS` name), groups and groups_used (groups <= 1:
    no grouping), gate_bias / probs_bias (whether llama.cpp adds those tensors where the GGUF has them)."""

    gating: str
    groups: int = 0
    groups_used: int = 0
    gate_bias: bool = False
    probs_bias: bool = False

    def __post_init__(self) -> None:
        assert self.gating in GATINGS, self.gating


def routing_rule(info: GGUFModel, reader: Any = None) -> RoutingRule:
    """The selection rule llama.cpp applies to the GGUF `info` describes (`reader`: its open
    `gguf.GGUFReader`, opened when None).

    Raises
    ------
    UsageError : the architecture is not in `ARCH_ROUTING`, or its gating is one llama.cpp cannot run.
    """
    arch = ARCH_ROUTING.get(info.architecture)
    if arch is None:
        raise UsageError(
            f"lookahead needs llama.cpp's expert-selection rule for the GGUF architecture "
            f"{info.architecture!r}, which moescope has not checked (known: {', '.join(sorted(ARCH_ROUTING))}); "
            f"capture without --lookahead, or add it to moescope.gguf.routing.ARCH_ROUTING after reading its "
            f"build_moe_ffn call in llama.cpp's src/models/"
        )
    gating = arch.gating
    if gating is None:
        reader = reader if reader is not None else open_gguf(info.path)
        key = f"{info.architecture}.expert_gating_func"
        raw = field(reader, key)
        gating = _default_gating(info, arch, reader) if raw in (None, 0) else GATING_IDS.get(raw)
        if gating is None:
            raise UsageError(
                f"{info.path!r} ({info.architecture}) has {key} = {raw!r}: no gating llama.cpp can route with "
                f"(known: {GATING_IDS}; {arch.source} has no default); re-convert it with a current "
                f"convert_hf_to_gguf.py, or capture without --lookahead"
            )
    groups, used = info.expert_groups, info.expert_groups_used
    if groups > 1 and not (info.n_experts % groups == 0 and info.n_experts // groups >= 2 and 0 < used < groups):
        raise FormatError(
            f"{info.path!r}: {info.n_experts} experts in {groups} groups, {used} used; llama.cpp needs groups of "
            f"at least 2 experts dividing the experts and 0 < groups used < groups: re-convert the model"
        )
    return RoutingRule(gating, groups, used, arch.gate_bias, arch.probs_bias)


def _default_gating(info: GGUFModel, arch: ArchRouting, reader: Any) -> str | None:
    """The gating llama.cpp assumes for a GGUF without ``expert_gating_func``."""
    if info.architecture == "deepseek2":
        # deepseek2.cpp: GLM 4.7 Lite conversions (47 or 48 layers, 154880 tokens) lack the key but use sigmoid
        vocab = field(reader, f"{info.architecture}.vocab_size")
        if vocab is None:
            tokens = reader.get_field("tokenizer.ggml.tokens")
            vocab = 0 if tokens is None else len(tokens.data)
        if info.trunk_blocks in (47, 48) and vocab == 154880:
            return "sigmoid"
    return arch.default_gating


# -- the pure core -------------------------------------------------------------------------------------
def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (float32 in, float32 out)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """[rows, k] int64: the columns of the k largest scores of each row of [rows, n] `scores`, largest first
    (ties in any order, as llama.cpp's ``std::sort`` argsort)."""
    n = scores.shape[1]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), scores.shape)
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.int64)


def gate(logits: np.ndarray, gating: str) -> np.ndarray:
    """[tokens, experts] router logits -> the probabilities ``build_moe_ffn`` selects from (``ffn_moe_probs``)."""
    x = np.asarray(logits, dtype=np.float32)
    if gating == "softmax":
        return softmax(x)
    if gating == "sigmoid":
        with np.errstate(over="ignore"):  # exp overflow -> inf -> probability 0, as in ggml
            return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    if gating == "softmax_weight":
        return x
    if gating == "sqrtsoftplus":  # ggml's softplus: x above 20, else log(1 + exp(x))
        with np.errstate(over="ignore"):
            return np.sqrt(np.where(x > 20, x, np.log(1 + np.exp(x)))).astype(np.float32)
    raise UsageError(f"gating {gating!r} is not one of {', '.join(GATINGS)}")


def select_experts(logits: np.ndarray, k: int, rule: RoutingRule, probs_bias: np.ndarray | None = None) -> np.ndarray:
    """The experts ``build_moe_ffn`` selects from router logits.

    Parameters
    ----------
    logits : [tokens, experts] float32, after the router bias where the architecture has one.
    k : experts per token.
    rule : the GGUF's `RoutingRule` (gating, groups).
    probs_bias : [experts] ``exp_probs_b``, added to the probabilities to select (None: none).

    Returns
    -------
    [tokens, k] int64 expert ids, best first.
    """
    scores = gate(logits, rule.gating)
    if probs_bias is not None:
        scores = scores + np.asarray(probs_bias, dtype=np.float32)
    n_tokens, n_experts = scores.shape
    if rule.groups > 1 and n_tokens:
        grouped = scores.reshape(n_tokens, rule.groups, n_experts // rule.groups)
        best_two = -np.partition(-grouped, 1, axis=2)[..., :2]
        group_score = best_two[..., 0] + best_two[..., 1]  # [tokens, groups]
        kept = np.argsort(-group_score, axis=1, kind="stable")[:, : rule.groups_used]
        masked = np.full(group_score.shape, True)
        np.put_along_axis(masked, kept, False, axis=1)
        scores = np.where(masked[..., None], -np.inf, grouped).reshape(n_tokens, n_experts)
    return top_k_ids(scores, k)


def top_candidates(logits: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """A router's top-m experts by logit and their probabilities (softmax over all experts), as the
    transformers capture records them (`moescope.capture.routers`).

    Parameters
    ----------
    logits : [tokens, experts] router logits (after the router bias where the architecture has one).

    Returns
    -------
    ids : [tokens, m] int64, best first; probs : [tokens, m] float32.
    """
    x = np.asarray(logits, dtype=np.float32)
    ids = top_k_ids(x, m)
    return ids, np.take_along_axis(softmax(x), ids, axis=1)


# -- the lookahead predictor ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Router:
    """One MoE layer's router from the GGUF: weight [experts, n_embd] float32, bias [experts] or None
    (``ffn_gate_inp.bias``), probs_bias [experts] or None (``exp_probs_b.bias``)."""

    weight: np.ndarray
    bias: np.ndarray | None
    probs_bias: np.ndarray | None

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """[tokens, n_embd] router input -> [tokens, experts] float32 logits."""
        out = hidden @ self.weight.T
        return out if self.bias is None else out + self.bias


def _tensor(tensors: dict[str, Any], name: str) -> np.ndarray | None:
    """A GGUF tensor as float32 (dequantised where needed; f32 ones stay memory-mapped), None if absent."""
    from gguf.quants import dequantize

    t = tensors.get(name)
    if t is None:
        return None
    try:
        data = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise FormatError(
            f"{name} is stored as {t.tensor_type.name}, which the gguf package cannot dequantize; "
            f"capture without --lookahead, or update the gguf package"
        ) from None
    return np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])


def router_biases(info: GGUFModel, reader: Any = None) -> dict[int, np.ndarray]:
    """{position in ``layer_ids``: [experts] ``ffn_gate_inp.bias``} for the MoE layers whose router has a bias
    in the GGUF (gpt-oss; llama.cpp adds it to the logits wherever an architecture loads it)."""
    names = {ROUTER_BIAS.format(layer=layer) for layer in info.layer_ids}
    if not any(t.name in names for t in info.tensors):
        return {}  # the usual case, without parsing the file again
    reader = reader if reader is not None else open_gguf(info.path)
    tensors = {t.name: t for t in reader.tensors}
    found = {j: _tensor(tensors, ROUTER_BIAS.format(layer=layer)) for j, layer in enumerate(info.layer_ids)}
    return {j: bias for j, bias in found.items() if bias is not None}


def read_routers(info: GGUFModel, rule: RoutingRule, reader: Any = None) -> list[Router]:
    """The router of every MoE layer of `info` (in ``layer_ids`` order), with the biases `rule` uses."""
    reader = reader if reader is not None else open_gguf(info.path)
    tensors = {t.name: t for t in reader.tensors}
    routers = []
    for layer in info.layer_ids:
        weight = _tensor(tensors, ROUTER_WEIGHT.format(layer=layer))
        assert weight is not None, layer  # inspect_gguf finds MoE layers by this tensor
        bias = _tensor(tensors, ROUTER_BIAS.format(layer=layer)) if rule.gate_bias else None
        probs_bias = _tensor(tensors, PROBS_BIAS.format(layer=layer)) if rule.probs_bias else None
        if weight.shape[0] != info.n_experts:
            raise FormatError(
                f"{info.path!r}: {ROUTER_WEIGHT.format(layer=layer)} has shape {weight.shape[::-1]} (GGUF order), "
                f"expected [n_embd, {info.n_experts}]; the file is not a MoE model moescope can route"
            )
        routers.append(Router(weight, bias, probs_bias))
    return routers


class Lookahead:
    """The routers of the next `distance` MoE layers applied to a router's input, with llama.cpp's rule.

    Parameters
    ----------
    info : the GGUF's layout (`moescope.gguf.inspect_gguf`).
    top_k : experts per token (llama.cpp's, overrides included).
    distance : N, how many MoE layers ahead (d = 1..N counts MoE layers, not blocks).
    reader : the GGUF's open `gguf.GGUFReader` (opened when None).

    Raises `UsageError` for an architecture whose rule is not in `ARCH_ROUTING` (before any weight is read).
    """

    def __init__(self, info: GGUFModel, *, top_k: int, distance: int, reader: Any = None) -> None:
        reader = reader if reader is not None else open_gguf(info.path)
        self.rule = routing_rule(info, reader)
        self.top_k, self.distance = int(top_k), int(distance)
        self.routers = read_routers(info, self.rule, reader)
        self.n_embd = self.routers[0].weight.shape[1]

    def route(self, j: int, hidden: np.ndarray) -> np.ndarray:
        """[tokens, k] the experts MoE layer `j` (position in ``layer_ids``) selects for `hidden`
        ([tokens, n_embd] float32, a router input)."""
        router = self.routers[j]
        return select_experts(router.logits(hidden), self.top_k, self.rule, router.probs_bias)

    def predict(self, j: int, hidden: np.ndarray) -> np.ndarray:
        """[tokens, distance, k] int64: at d = 1..distance, the experts MoE layer j + d selects for `hidden`
        (the input of layer j's router); -1 where j + d is past the last MoE layer."""
        out = np.full((hidden.shape[0], self.distance, self.top_k), -1, dtype=np.int64)
        for d in range(1, min(self.distance, len(self.routers) - 1 - j) + 1):
            out[:, d - 1] = self.route(j + d, hidden)
        return out


__all__ = [
    "ARCH_ROUTING",
    "GATINGS",
    "Lookahead",
    "RoutingRule",
    "routing_rule",
    "select_experts",
    "top_candidates",
]
