"""The llama.cpp offload plan: how many MoE layers' experts fit in VRAM, as ``--n-cpu-moe`` and ``-ot``.

VRAM accounting (stated with every plan):

- weights: every non-expert tensor except the token embedding table (llama.cpp keeps the input layer in
  host memory), i.e. attention, norms, routers, shared experts, dense FFN blocks, output head; MTP / NextN
  blocks are not loaded in normal decoding and count nowhere (their bytes are listed by ``gguf inspect``);
- KV cache: ``ctx x layers x (heads_kv x key_length + heads_kv x value_length)`` elements of the KV type
  (MLA models, with ``attention.kv_lora_rank``: ``ctx x layers x (kv_lora_rank + rope dims)``);
  sliding-window layers are counted at full context (an upper bound); MTP blocks have no KV cache in the
  main context;
- compute buffer: an allowance (default 512 MiB + ubatch x vocab x 4 bytes of logits);
- experts: whole MoE layers, ``E x bytes per expert`` each, as many as the rest of the VRAM holds.

Conventions. ``--n-cpu-moe N`` keeps the experts of the first N *blocks* (``blk.0 .. blk.N-1``, leading
dense blocks counted) on the CPU: llama.cpp's `common/arg.cpp` pushes one override per block built by
``llm_ffn_exps_block_regex(i)`` = ``blk\\.<i>\\.ffn_(up|down|gate|gate_up)_(ch|)exps`` bound to the CPU.
The ``-ot`` form lists the same blocks in one rule (llama.cpp applies ``regex_search``; the first matching
rule wins). We check that both forms move exactly the same tensors of this file. llama.cpp's automatic
``--fit`` moves the *last* layers' experts to the CPU instead, and turns itself off when ``-ngl`` or
``-ot`` is given; the plan below uses the first-N convention for both forms.

Speed (projected with `moescope.cache.cost`): decode computes CPU-resident experts on the CPU; prefill
batches of >= 32 tokens (``GGML_OP_OFFLOAD_MIN_BATCH``) stream CPU-resident expert weights to the GPU, so a
ubatch pays PCIe time for every CPU-resident expert it uses.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from moescope._units import format_bytes
from moescope.errors import FormatError, UsageError
from moescope.gguf.inspect import GGUFModel, field, open_header

# bytes per element of the KV cache types llama.cpp accepts (block types: block bytes / 32 values)
KV_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "iq4_nl": 18 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}
EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"  # llama.cpp common.h LLM_FFN_EXPS_REGEX
OFFLOAD_MIN_BATCH = 32
DEFAULT_COMPUTE = 512 * 2**20  # compute-buffer allowance per GPU (the output GPU adds the logits)


def block_regex(i: int) -> str:
    """llama.cpp's ``llm_ffn_exps_block_regex(i)``."""
    return rf"blk\.{i}{EXPS_REGEX}"


def ot_rule(blocks: list[int]) -> str | None:
    """One ``-ot`` rule sending the routed experts of `blocks` to the CPU (None for no block)."""
    if not blocks:
        return None
    return rf"blk\.({'|'.join(str(b) for b in blocks)}){EXPS_REGEX}=CPU"


def cpu_tensors(names: list[str], rules: list[str]) -> set[str]:
    """Tensors that rules ``PATTERN=CPU`` send to the CPU (llama.cpp: regex_search, first match wins)."""
    out = set()
    for name in names:
        for rule in rules:
            pattern, _, buft = rule.rpartition("=")
            if re.search(pattern, name):
                if buft == "CPU":
                    out.add(name)
                break
    return out


@dataclasses.dataclass(frozen=True)
class OffloadPlan:
    """Bytes (VRAM accounting), the MoE blocks whose experts stay on the CPU, and the flags."""

    vram: int
    weights: int
    kv_cache: int
    compute: int
    expert_layer_bytes: dict[int, int]
    gpu_blocks: tuple[int, ...]
    cpu_blocks: tuple[int, ...]
    n_cpu_moe: int
    ot: str | None
    forms_agree: bool
    ctx: int
    kv_type: str
    notes: tuple[str, ...]

    @property
    def free_for_experts(self) -> int:
        return self.vram - self.weights - self.kv_cache - self.compute

    @property
    def experts_in_vram(self) -> int:
        return sum(self.expert_layer_bytes[b] for b in self.gpu_blocks)

    def flags(self) -> dict[str, str]:
        out = {"n_cpu_moe": f"-ngl 999 --n-cpu-moe {self.n_cpu_moe}"}
        out["override_tensor"] = "-ngl 999" + (f' -ot "{self.ot}"' if self.ot else "")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(free_for_experts=self.free_for_experts, experts_in_vram=self.experts_in_vram, flags=self.flags())
        d["expert_layer_bytes"] = {str(k): v for k, v in self.expert_layer_bytes.items()}
        return d


def kv_cache_bytes(model: GGUFModel, reader: Any, ctx: int, kv_type: str) -> int:
    """KV cache bytes for `ctx` tokens (see the module docstring for MLA and sliding windows)."""
    return int(kv_bytes_per_block(model, reader, ctx, kv_type).sum())


def kv_bytes_per_block(model: GGUFModel, reader: Any, ctx: int, kv_type: str) -> np.ndarray:
    """[n_trunk] int64 KV-cache bytes per trunk block for `ctx` tokens; they sum to the whole cache's bytes
    rounded down once (block types such as q8_0 are fractional bytes per element: the remainder of that
    rounding goes to the last block)."""
    if kv_type not in KV_BYTES:
        raise UsageError(f"--kv-type {kv_type!r}: expected one of {', '.join(KV_BYTES)}")
    elements = kv_elements_per_block(model, reader)
    per = (ctx * elements * KV_BYTES[kv_type]).astype(np.int64)
    per[-1] += int(ctx * int(elements.sum()) * KV_BYTES[kv_type]) - int(per.sum())
    return per


def compute_allowances(model: GGUFModel, n_devices: int, compute: int | None = None, ubatch: int = 512) -> list[int]:
    """Compute-buffer bytes each of `n_devices` GPUs reserves: `compute` when given; else `DEFAULT_COMPUTE`,
    and the last GPU (the output layer's) also ubatch x vocab x 4 bytes of logits."""
    if compute is not None:
        return [compute] * n_devices
    vocab = next((t.shape[-1] for t in model.tensors if t.name == "token_embd.weight"), 0)
    out = [DEFAULT_COMPUTE] * n_devices
    out[-1] += ubatch * vocab * 4
    return out


def kv_elements_per_block(model: GGUFModel, reader: Any) -> np.ndarray:
    """[n_trunk] int64: KV cache elements one token adds in each trunk block (K + V; MLA: the latent)."""
    from gguf import Keys

    arch = model.architecture
    n_embd = int(field(reader, Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)) or 0)
    heads = field(reader, Keys.Attention.HEAD_COUNT.format(arch=arch)) or 1
    heads_kv = field(reader, Keys.Attention.HEAD_COUNT_KV.format(arch=arch)) or heads
    n_layers = model.trunk_blocks  # llama.cpp's main context keeps no KV cache for MTP blocks
    heads_l, heads_kv_l = (
        _per_block(v, n_layers, k.format(arch=arch))
        for v, k in ((heads, Keys.Attention.HEAD_COUNT), (heads_kv, Keys.Attention.HEAD_COUNT_KV))
    )
    lora = field(reader, Keys.Attention.KV_LORA_RANK.format(arch=arch))
    if lora:
        rope = int(field(reader, Keys.Rope.DIMENSION_COUNT.format(arch=arch)) or 64)
        return np.full(n_layers, int(lora) + rope, dtype=np.int64)
    k_len = field(reader, Keys.Attention.KEY_LENGTH.format(arch=arch))
    v_len = field(reader, Keys.Attention.VALUE_LENGTH.format(arch=arch))
    head_dim = n_embd // np.maximum(heads_l, 1)
    k = np.full(n_layers, k_len) if k_len else head_dim
    v = np.full(n_layers, v_len) if v_len else head_dim
    return np.asarray(heads_kv_l * (k + v), dtype=np.int64)


def _per_block(value: Any, n_layers: int, key: str) -> np.ndarray:
    """[n_layers] int64 of a scalar or per-block metadata value (a per-block array may also cover MTP blocks,
    which come last)."""
    a = np.asarray(value, dtype=np.int64)
    if a.ndim == 0:
        return np.broadcast_to(a, (n_layers,))
    if a.ndim != 1 or a.size < n_layers:
        raise FormatError(f"metadata {key} has {a.size} values for {n_layers} blocks; re-convert the model")
    return a[:n_layers]


def plan_offload(
    model: GGUFModel,
    vram: int,
    *,
    ctx: int = 4096,
    kv_type: str = "f16",
    compute: int | None = None,
    ubatch: int = 512,
) -> OffloadPlan:
    """Fit whole MoE layers' experts into `vram` after weights, KV cache and compute buffer (first N on CPU)."""
    if ctx < 1:
        raise UsageError(f"--ctx {ctx}: expected a positive context length")
    reader = open_header(model.path)
    names = [t.name for t in model.tensors]
    weights = model.dense_bytes_per_token
    kv = kv_cache_bytes(model, reader, ctx, kv_type)
    compute = compute_allowances(model, 1, compute, ubatch)[0]
    notes = []
    free = vram - weights - kv - compute
    if free < 0:
        raise UsageError(
            f"{format_bytes(vram)} of VRAM does not hold even the non-expert weights ({format_bytes(weights)}), "
            f"KV cache ({format_bytes(kv)} at ctx {ctx}, {kv_type}) and compute buffer ({format_bytes(compute)}); "
            f"lower --ctx, use --kv-type q8_0, or run all on CPU"
        )
    layer_bytes = {b: model.expert_bytes[b] * model.n_experts for b in model.layer_ids}
    # first-N convention: the GPU keeps the LAST MoE blocks; find the fewest CPU blocks that make the rest fit
    blocks = list(model.layer_ids)
    n_cpu_moe_blocks = len(blocks)
    for cut in range(len(blocks) + 1):
        if sum(layer_bytes[b] for b in blocks[cut:]) <= free:
            n_cpu_moe_blocks = cut
            break
    cpu = blocks[:n_cpu_moe_blocks]
    gpu = blocks[n_cpu_moe_blocks:]
    n_cpu_moe = 0 if not cpu else cpu[-1] + 1  # a block count from blk.0: leading dense blocks included
    if model.leading_dense_blocks and cpu:
        notes.append(f"--n-cpu-moe counts the {model.leading_dense_blocks} leading dense block(s) too")
    ot = ot_rule(cpu)
    by_n = cpu_tensors(names, [block_regex(i) + "=CPU" for i in range(n_cpu_moe)])
    by_ot = cpu_tensors(names, [ot] if ot else [])
    return OffloadPlan(
        vram,
        weights,
        kv,
        compute,
        layer_bytes,
        tuple(gpu),
        tuple(cpu),
        n_cpu_moe,
        ot,
        by_n == by_ot,
        ctx,
        kv_type,
        tuple(notes),
    )


def prefill_pcie_seconds_per_token(
    plan: OffloadPlan, experts_used_per_ubatch: float | dict[int, float], n_experts: int, ubatch: int, pcie_gbps: float
) -> float:
    """PCIe seconds per prefill token: each ubatch streams every CPU-resident expert it uses to the GPU
    (`experts_used_per_ubatch`: one mean for every layer, or per MoE block)."""
    if ubatch < OFFLOAD_MIN_BATCH:
        return 0.0
    used = experts_used_per_ubatch
    per_expert = {b: plan.expert_layer_bytes[b] / n_experts for b in plan.cpu_blocks}
    total = sum(per_expert[b] * (used[b] if isinstance(used, dict) else used) for b in plan.cpu_blocks)
    return total / (pcie_gbps * 1e9) / ubatch


def experts_per_window(trace: Any, window: int) -> float:
    """Mean distinct experts per layer used by `window` consecutive tokens of `trace` (whole windows only;
    the mean over layers and windows; all of a shorter trace as one window)."""
    by_layer = experts_per_window_by_layer(trace, window)
    return float(np.mean(list(by_layer.values()))) if by_layer else 0.0


def experts_per_window_by_layer(trace: Any, window: int) -> dict[int, float]:
    """MoE block id -> mean distinct experts used by `window` consecutive tokens of `trace` in that layer
    (whole windows only; all of a shorter trace as one window)."""
    n = trace.n_tokens
    w = min(window, n)
    out = {}
    for i, lid in enumerate(trace.layer_ids):
        ex = trace.experts[:, i, :]
        counts = [np.unique(ex[a : a + w]).size for a in range(0, n - w + 1, w)]
        out[int(lid)] = float(np.mean(counts)) if counts else 0.0
    return out


def project_plan(
    plan: OffloadPlan,
    model: GGUFModel,
    *,
    top_k: int,
    hw: Any,
    experts_per_ubatch: float | dict[int, float] | None = None,
    ubatch: int = 512,
) -> dict[str, Any]:
    """Decode tokens/s of the plan (CPU-resident experts computed on the CPU) and the PCIe bound on prefill
    tokens/s (CPU-resident experts streamed to the GPU per ubatch), with the cost model's assumptions.
    `experts_per_ubatch`: distinct experts a ubatch uses per layer (a mean, or per MoE block from a trace);
    None: every expert."""
    eb = {b: model.expert_bytes[b] for b in model.layer_ids}
    gpu, cpu = hw.gpu_gbps * 1e9, hw.cpu_gbps * 1e9
    dense = model.dense_bytes_per_token / gpu
    t_decode = (
        dense + sum(top_k * eb[b] for b in plan.gpu_blocks) / gpu + sum(top_k * eb[b] for b in plan.cpu_blocks) / cpu
    )
    used = float(model.n_experts) if experts_per_ubatch is None else experts_per_ubatch
    t_stream = prefill_pcie_seconds_per_token(plan, used, model.n_experts, ubatch, hw.pcie_gbps)
    if isinstance(used, dict):  # the mean over the CPU-resident layers (what is streamed)
        used = float(np.mean([used[b] for b in plan.cpu_blocks])) if plan.cpu_blocks else 0.0
    return {
        "decode_tokens_per_s": 1.0 / t_decode,
        "decode_ms_per_token": t_decode * 1e3,
        "prefill_pcie_bound_tokens_per_s": (1.0 / t_stream) if t_stream > 0 else None,
        "experts_streamed_per_ubatch_per_layer": used if plan.cpu_blocks else 0.0,
        "ubatch": ubatch,
    }
