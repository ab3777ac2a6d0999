"""Find the router of every MoE layer of a transformers model and record what it routed, with hooks.

A forward hook on each router reads the expert ids and gate weights the model *actually used* (after any
bias, group limit or renormalisation), never a top-k recomputed from logits: the logits
``output_router_logits`` returns are pre-bias, so a recomputed top-k is wrong for DeepSeek-V3
(score-correction bias + group-limited routing) and for any router that is not a plain softmax top-k.

Routers are found generically: a class listed in `ROUTER_FORMATS` (the formats as data), else a class the
model itself records as ``router_logits`` (its ``_can_record_outputs``), else a ``*Router`` / ``*Gate``
module beside an ``experts`` module; for the last two the ids and weights are found from the output
shapes (an integer ``[tokens, k]`` tensor and a float one of the same shape). A model with no router, or
a router whose output cannot be read, raises `CaptureError` naming the class: nothing is recorded silently.
Shared experts (DeepSeek, Qwen2-MoE) are not routed and not recorded; dense layers have no router, so they
are absent from ``layer_ids``. This module runs no model and writes nothing (see `moescope.capture.hf`).

Two optional recordings, for prefetching studies:

- **lookahead N**: at every MoE layer, the routers of the next N MoE layers (the model's own modules, so
  bias, groups and renormalisation are exact) are applied to the input of this layer's router, and the
  experts they choose are recorded: what a runtime that prefetches from an earlier hidden state would
  predict (Mixtral-offloading, ProMoE, HOBBIT). Distance d counts MoE layers; -1 past the last one.
- **candidates M**: the router's top-M experts by router logit and their probabilities (softmax of the
  logits): the chosen ones and the near misses. For routers that choose with a bias added after the
  gate (DeepSeek-V3's correction bias), the ranking is the logits', not the selection's.

    >>> with RouterRecorder(model) as rec:
    ...     model(input_ids, attention_mask=mask)
    ...     experts, weights = rec.collect(mask)         # [tokens, layers, k] each
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moescope.errors import CaptureError, UsageError, require


def _torch() -> Any:
    return require("torch", "hf", "capturing routing from transformers models")


@dataclasses.dataclass(frozen=True)
class RouterFormat:
    """How to read one router class's output tuple.

    arch : the transformers ``model_type`` it belongs to.
    ids_at, weights_at : index in the output tuple of the ``[tokens, k]`` expert ids / gate weights.
    weights : what the gate weights are (for the docs).
    logits_at : index of the ``[tokens, experts]`` router logits.
    """

    arch: str
    ids_at: int
    weights_at: int
    weights: str
    logits_at: int = 0


# Every entry verified against transformers 5.x: each router returns (router_logits, weights, ids).
ROUTER_FORMATS: dict[str, RouterFormat] = {
    "Qwen2MoeTopKRouter": RouterFormat("qwen2_moe", 2, 1, "softmax top-k, renormalised if norm_topk_prob"),
    "Qwen3MoeTopKRouter": RouterFormat("qwen3_moe", 2, 1, "softmax top-k, renormalised if norm_topk_prob"),
    "OlmoeTopKRouter": RouterFormat("olmoe", 2, 1, "softmax top-k, renormalised if norm_topk_prob"),
    "MixtralTopKRouter": RouterFormat("mixtral", 2, 1, "softmax top-k, renormalised"),
    "DeepseekV2TopkRouter": RouterFormat("deepseek_v2", 2, 1, "softmax (group-limited) top-k x routed_scaling"),
    "DeepseekV3TopkRouter": RouterFormat(
        "deepseek_v3", 2, 1, "sigmoid, chosen with e_score_correction_bias + groups, normalised x routed_scaling"
    ),
    "GptOssTopKRouter": RouterFormat("gpt_oss", 2, 1, "top-k of biased logits, softmax over the k"),
    "GraniteMoeTopKRouter": RouterFormat("granitemoe", 2, 1, "top-k logits, softmax over the k"),
    "PhimoeTopKRouter": RouterFormat("phimoe", 2, 1, "sparsemixer top-2 multipliers"),
}
_N_EXPERTS_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts")
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok")
_GENERIC_NAME = re.compile(r"(Router|Gate)$")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")
_ANY_INDEX = re.compile(r"\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class RouterSite:
    """One MoE layer's router in a loaded model.

    name : the module's qualified name, e.g. ``model.layers.3.mlp.gate``.
    layer_id : its decoder layer index (3 above).
    n_experts, top_k : routed experts of the layer and experts per token.
    fmt : the known output format, or None when it is found from the output shapes.
    """

    name: str
    layer_id: int
    n_experts: int
    top_k: int
    fmt: RouterFormat | None


def _first_attr(objs: Sequence[Any], attrs: Sequence[str]) -> int | None:
    for obj in objs:
        for attr in attrs:
            value = getattr(obj, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _recorded_router_classes(model: Any) -> set[str]:
    """Class names the model's own output capturing treats as routers (``_can_record_outputs``)."""
    names = set()
    for module in model.modules():
        spec = (getattr(module, "_can_record_outputs", None) or {}).get("router_logits")
        for rec in spec if isinstance(spec, (list, tuple)) else [spec]:
            target = getattr(rec, "target_class", None) or (rec if isinstance(rec, type) else None)
            if target is not None:
                names.add(target.__name__)
            if getattr(rec, "class_name", None):
                names.add(rec.class_name)
    return names


def find_routers(model: Any) -> list[RouterSite]:
    """The router of every MoE layer of `model`, in layer order.

    Raises
    ------
    CaptureError : no router recognised, a router outside a numbered layer, or layers that disagree
        on the number of experts / top-k.
    """
    model_cls = type(model).__name__
    recorded = _recorded_router_classes(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    modules = dict(model.named_modules())
    sites = []
    for name, module in modules.items():
        cls = type(module).__name__
        parent = modules.get(name.rpartition(".")[0])
        generic = cls in recorded or (_GENERIC_NAME.search(cls) and hasattr(parent, "experts"))
        if cls not in ROUTER_FORMATS and not generic:
            continue
        match = _LAYER_INDEX.search(name) or ([*_ANY_INDEX.finditer(name)] or [None])[-1]
        if match is None:
            raise CaptureError(f"{model_cls}: router {name} ({cls}) is not inside a numbered decoder layer")
        n_experts = _first_attr([module, config], _N_EXPERTS_ATTRS)
        top_k = _first_attr([module, config], _TOP_K_ATTRS)
        if n_experts is None or top_k is None:
            raise CaptureError(
                f"{model_cls}: router {name} ({cls}) has no num_experts / top_k attribute and the config "
                f"names none; add an entry for {cls} to moescope.capture.hf.ROUTER_FORMATS"
            )
        sites.append(RouterSite(name, int(match.group(1)), n_experts, top_k, ROUTER_FORMATS.get(cls)))
    if not sites:
        raise CaptureError(
            f"{model_cls} has no Mixture-of-Experts router moescope recognises (known router classes: "
            f"{', '.join(sorted(ROUTER_FORMATS))}); check that this is a MoE model"
        )
    sites.sort(key=lambda s: s.layer_id)
    ids = [s.layer_id for s in sites]
    shapes = {(s.n_experts, s.top_k) for s in sites}
    if len(set(ids)) != len(ids) or len(shapes) != 1:
        raise CaptureError(
            f"{model_cls}: routers {[s.name for s in sites][:6]} give layers {ids} and (experts, top-k) "
            f"{sorted(shapes)}; a trace needs one router per layer and the same shape in every layer"
        )
    return sites


MAX_LOOKAHEAD = 3  # --lookahead: later MoE layers' routers applied at each layer, at most


def check_extra_options(lookahead: int, candidates: int, top_k: int, n_experts: int) -> None:
    """The --lookahead / --candidates options of both captures (transformers and llama.cpp), checked."""
    if not 0 <= lookahead <= MAX_LOOKAHEAD:
        raise UsageError(f"--lookahead {lookahead}: expected 0..{MAX_LOOKAHEAD} MoE layers ahead")
    if candidates and not top_k < candidates <= n_experts:
        raise UsageError(
            f"--candidates {candidates}: expected more than top-k ({top_k}) and at most the {n_experts} experts, or 0"
        )


def extra_shapes(n_layers: int, top_k: int, lookahead: int, candidates: int) -> dict[str, tuple[int, ...]]:
    """The trailing shapes of the extras a capture with these options keeps (for `moescope.store.TraceWriter`)."""
    out: dict[str, tuple[int, ...]] = {}
    if lookahead:
        out["lookahead"] = (n_layers, lookahead, top_k)
    if candidates:
        out["candidates"] = out["candidate_probs"] = (n_layers, candidates)
    return out


class RouterRecorder:
    """Hooks on every router of a loaded model, collecting what each forward routed.

    Use as a context manager (hooks are installed on enter and removed on exit)::

        with RouterRecorder(model, lookahead=2, candidates=12) as rec:
            model(input_ids, attention_mask=mask)
            experts, weights, extras = rec.collect_all(mask)   # [tokens, layers, k] each; extras below

    Parameters
    ----------
    model : a loaded transformers model.
    lookahead : N, the next MoE layers whose routers are applied to each router's input (0-3; module docstring).
    candidates : M, the router's top-M experts recorded with their probabilities (0, or k < M <= E).

    Attributes: sites (`RouterSite` per layer), layer_ids [layers], n_experts, top_k, router_classes.
    """

    def __init__(self, model: Any, *, lookahead: int = 0, candidates: int = 0) -> None:
        self.model = model
        self.sites = find_routers(model)
        self.layer_ids = [s.layer_id for s in self.sites]
        self.n_experts, self.top_k = self.sites[0].n_experts, self.sites[0].top_k
        check_extra_options(lookahead, candidates, self.top_k, self.n_experts)
        self.lookahead, self.candidates = int(lookahead), int(candidates)
        modules = dict(model.named_modules())
        self._modules = [modules[s.name] for s in self.sites]
        self.router_classes = sorted({type(m).__name__ for m in self._modules})
        self._out: list[list[dict[str, Any]]] = [[] for _ in self.sites]
        self._at: list[tuple[int, int, int | None] | None] = [
            None if s.fmt is None else (s.fmt.ids_at, s.fmt.weights_at, s.fmt.logits_at) for s in self.sites
        ]
        self._handles: list[Any] = []
        self._ahead = False  # True while a later layer's router runs for a lookahead: its hook records nothing

    @property
    def n_layers(self) -> int:
        return len(self.sites)

    def extra_shapes(self) -> dict[str, tuple[int, ...]]:
        """The trailing shapes of the extras `collect_all` returns (for `moescope.store.TraceWriter`)."""
        return extra_shapes(self.n_layers, self.top_k, self.lookahead, self.candidates)

    def __enter__(self) -> RouterRecorder:
        for i, module in enumerate(self._modules):
            self._handles.append(module.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    def reset(self) -> None:
        """Drop everything recorded so far."""
        self._out = [[] for _ in self.sites]

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            if self._ahead:
                return
            at = self._at[i] or self._detect(i, module, output)
            self._at[i] = at
            ids = output[at[0]].detach()
            tokens = ids.reshape(-1, ids.shape[-1])
            rec = {"ids": tokens, "weights": output[at[1]].detach().reshape(tokens.shape)}
            if self.candidates:
                rec["candidates"] = self._candidates(i, output[at[2]] if at[2] is not None else None)
            if self.lookahead:
                rec["lookahead"] = self._look_ahead(i, args, kwargs, tokens.shape[0])
            self._out[i].append(rec)

        return hook

    def _candidates(self, i: int, logits: Any) -> tuple[Any, Any]:
        """([tokens, M] ids, [tokens, M] probabilities) of the router's top-M logits."""
        torch = _torch()
        if logits is None:
            raise CaptureError(
                f"router {self.sites[i].name} gives no [tokens, experts] logits; --candidates needs them"
            )
        flat = logits.detach().reshape(-1, logits.shape[-1]).float()
        top = torch.topk(flat, self.candidates, dim=-1)
        return top.indices, torch.softmax(flat, dim=-1).gather(-1, top.indices)

    def _look_ahead(self, i: int, args: Any, kwargs: Any, n_tokens: int) -> Any:
        """[tokens, N, k] experts the routers of MoE layers i+1..i+N choose from router i's input (-1 past
        the last layer)."""
        torch = _torch()
        out = torch.full((n_tokens, self.lookahead, self.top_k), -1, dtype=torch.long)
        self._ahead = True
        try:
            for d in range(1, self.lookahead + 1):
                j = i + d
                if j >= self.n_layers:
                    break
                result = self._modules[j](*args, **kwargs)
                at = self._at[j] or self._detect(j, self._modules[j], result)
                self._at[j] = at
                out[:, d - 1] = result[at[0]].detach().reshape(n_tokens, -1).to(out.device)
        finally:
            self._ahead = False
        return out

    def _detect(self, i: int, module: Any, output: Any) -> tuple[int, int, int | None]:
        """Find ids, weights (int and float tensors of shape [tokens, k]) and logits (a float [tokens, E]
        tensor, None when absent) in an unknown router's output."""
        site = self.sites[i]
        torch = _torch()
        parts = list(output) if isinstance(output, (tuple, list)) else [output]
        shapes = [tuple(p.shape) if torch.is_tensor(p) else type(p).__name__ for p in parts]
        ints = [
            j
            for j, p in enumerate(parts)
            if torch.is_tensor(p)
            and not p.is_floating_point()
            and p.dtype != torch.bool
            and p.ndim >= 2
            and p.shape[-1] == site.top_k
        ]
        logits = next(
            (
                j
                for j, p in enumerate(parts)
                if torch.is_tensor(p) and p.is_floating_point() and p.shape[-1] == site.n_experts
            ),
            None,
        )
        for j in reversed(ints):
            w = [m for m, p in enumerate(parts) if m != j and shapes[m] == shapes[j] and p.is_floating_point()]
            if w:
                return j, w[0], logits
        raise CaptureError(
            f"{type(self.model).__name__}: router {site.name} ({type(module).__name__}) returned shapes {shapes}, "
            f"without an integer [tokens, {site.top_k}] expert-id tensor and matching gate weights; moescope "
            f"cannot tell which experts were used: add an entry to moescope.capture.hf.ROUTER_FORMATS"
        )

    def collect(self, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """`collect_all` without the extras: ``(experts, weights)``."""
        experts, weights, _ = self.collect_all(attention_mask)
        return experts, weights

    def collect_all(self, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """What the routers did since the last `collect` / `reset`, then reset.

        Parameters
        ----------
        attention_mask : [batch, seq] 0/1 mask of the forward(s), or None. When given, padding tokens
            (mask 0) are removed.

        Returns
        -------
        experts : [tokens, layers, k] int64, tokens in batch row-major order (row 0's tokens first).
        weights : [tokens, layers, k] float32 gate weights.
        extras : with lookahead, ``lookahead [tokens, layers, N, k]`` int64 (-1 past the last layer); with
            candidates, ``candidates [tokens, layers, M]`` int64 and ``candidate_probs`` float32.
        """
        torch = _torch()
        missing = [s.name for s, out in zip(self.sites, self._out, strict=True) if not out]
        if missing and len(missing) < self.n_layers:
            raise CaptureError(f"routers {missing[:4]} did not run in this forward; was the model run in full?")
        if missing:
            empty = {name: np.zeros((0, *tail)) for name, tail in self.extra_shapes().items()}
            zeros = np.zeros((0, self.n_layers, self.top_k))
            return zeros.astype(np.int64), zeros.astype(np.float32), empty

        def stacked(key: str, part: int | None = None) -> Any:
            pieces = [[o[key] if part is None else o[key][part] for o in out] for out in self._out]
            return torch.stack([torch.cat(p) for p in pieces], dim=1)

        ids, w = stacked("ids"), stacked("weights").float()
        extras = {}
        if self.lookahead:
            extras["lookahead"] = stacked("lookahead")
        if self.candidates:
            extras["candidates"], extras["candidate_probs"] = stacked("candidates", 0), stacked("candidates", 1)
        self.reset()
        if attention_mask is not None:
            keep = attention_mask.reshape(-1).to(ids.device).bool()
            if keep.numel() != ids.shape[0]:
                raise CaptureError(
                    f"the routers saw {ids.shape[0]} tokens but the attention mask has {keep.numel()}; pass "
                    f"the mask of the forward that was recorded"
                )
            ids, w = ids[keep], w[keep]
            extras = {name: x[keep.to(x.device)] for name, x in extras.items()}
        arrays = {name: x.cpu().numpy() for name, x in extras.items()}
        return ids.cpu().numpy().astype(np.int64), w.cpu().numpy(), arrays
