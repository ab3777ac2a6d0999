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

from moescope.errors import CaptureError, require


def _torch() -> Any:
    return require("torch", "hf", "capturing routing from transformers models")


@dataclasses.dataclass(frozen=True)
class RouterFormat:
    """How to read one router class's output tuple.

    arch : the transformers ``model_type`` it belongs to.
    ids_at, weights_at : index in the output tuple of the ``[tokens, k]`` expert ids / gate weights.
    weights : what the gate weights are (for the docs).
    """

    arch: str
    ids_at: int
    weights_at: int
    weights: str


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


class RouterRecorder:
    """Hooks on every router of a loaded model, collecting what each forward routed.

    Use as a context manager (hooks are installed on enter and removed on exit)::

        with RouterRecorder(model) as rec:
            model(input_ids, attention_mask=mask)
            experts, weights = rec.collect(mask)      # [tokens, layers, k] each

    Attributes: sites (`RouterSite` per layer), layer_ids [layers], n_experts, top_k, router_classes.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.sites = find_routers(model)
        self.layer_ids = [s.layer_id for s in self.sites]
        self.n_experts, self.top_k = self.sites[0].n_experts, self.sites[0].top_k
        modules = dict(model.named_modules())
        self._modules = [modules[s.name] for s in self.sites]
        self.router_classes = sorted({type(m).__name__ for m in self._modules})
        self._out: list[list[tuple[Any, Any]]] = [[] for _ in self.sites]
        self._at: list[tuple[int, int] | None] = [
            None if s.fmt is None else (s.fmt.ids_at, s.fmt.weights_at) for s in self.sites
        ]
        self._handles: list[Any] = []

    @property
    def n_layers(self) -> int:
        return len(self.sites)

    def __enter__(self) -> RouterRecorder:
        for i, module in enumerate(self._modules):
            self._handles.append(module.register_forward_hook(self._hook(i)))
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
        def hook(module: Any, args: Any, output: Any) -> None:
            at = self._at[i] or self._detect(i, module, output)
            self._at[i] = at
            ids, weights = output[at[0]], output[at[1]]
            self._out[i].append((ids.detach().reshape(-1, ids.shape[-1]), weights.detach().reshape(ids.shape)))

        return hook

    def _detect(self, i: int, module: Any, output: Any) -> tuple[int, int]:
        """Find ids and weights in an unknown router's output: int and float tensors of shape [tokens, k]."""
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
        for j in reversed(ints):
            w = [m for m, p in enumerate(parts) if m != j and shapes[m] == shapes[j] and p.is_floating_point()]
            if w:
                return j, w[0]
        raise CaptureError(
            f"{type(self.model).__name__}: router {site.name} ({type(module).__name__}) returned shapes {shapes}, "
            f"without an integer [tokens, {site.top_k}] expert-id tensor and matching gate weights; moescope "
            f"cannot tell which experts were used: add an entry to moescope.capture.hf.ROUTER_FORMATS"
        )

    def collect(self, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """What the routers did since the last `collect` / `reset`, then reset.

        Parameters
        ----------
        attention_mask : [batch, seq] 0/1 mask of the forward(s), or None. When given, padding tokens
            (mask 0) are removed.

        Returns
        -------
        experts : [tokens, layers, k] int64, tokens in batch row-major order (row 0's tokens first).
        weights : [tokens, layers, k] float32 gate weights.
        """
        torch = _torch()
        missing = [s.name for s, out in zip(self.sites, self._out, strict=True) if not out]
        if missing and len(missing) < self.n_layers:
            raise CaptureError(f"routers {missing[:4]} did not run in this forward; was the model run in full?")
        if missing:
            empty = np.zeros((0, self.n_layers, self.top_k))
            return empty.astype(np.int64), empty.astype(np.float32)
        ids = torch.stack([torch.cat([o[0] for o in out]) for out in self._out], dim=1)
        w = torch.stack([torch.cat([o[1] for o in out]).float() for out in self._out], dim=1)
        self.reset()
        if attention_mask is not None:
            keep = attention_mask.reshape(-1).to(ids.device).bool()
            if keep.numel() != ids.shape[0]:
                raise CaptureError(
                    f"the routers saw {ids.shape[0]} tokens but the attention mask has {keep.numel()}; pass "
                    f"the mask of the forward that was recorded"
                )
            ids, w = ids[keep], w[keep]
        return ids.cpu().numpy().astype(np.int64), w.cpu().numpy()
