"""Offload plans over one or several GPUs and the CPU, for llama.cpp or ik_llama.cpp, as flags and a plan file.

`plan_devices` places each block's non-expert weights and KV cache on a GPU, and each MoE block's routed
experts on that GPU or on the CPU, so that every GPU's budget holds its share (the accounting of
`moescope.gguf.plan`, per device); it keeps as many MoE layers' experts in VRAM as fit. What it does not do:
choose experts within a layer (whole layers move), split one layer across GPUs (``-sm row`` / ik's
``-sm graph``), or measure anything (the speed projection is `moescope.gguf.plan.project_plan`'s cost model).

How the engines place tensors (the flags printed follow these rules; each is cited from the source read):

- **Layers to GPUs** (llama.cpp ``src/llama-model.cpp``, ``load_tensors``: ``get_layer_buft_list``). With
  ``-ngl 999`` every layer ``il`` of ``0 .. block_count`` (``il = block_count`` is the output layer, MTP
  blocks included in the count) goes to device ``upper_bound(splits, il / (block_count + 1))``, where
  ``splits`` are the cumulative, normalised ``--tensor-split`` values (float32). So integer values
  ``c_0, c_1, ...`` (the layers of each device, the last one counting the MTP blocks and the output layer)
  put exactly ``c_0`` layers on the first device and so on; `layer_devices` mirrors this. The token
  embedding (input layer) always stays on the CPU; a layer's KV cache lives with the layer.
- **Tensor overrides** (``-ot PATTERN=BUFFER``; llama.cpp ``llama-model-loader.cpp``, ik
  ``llama-load-tensors.cpp``): ``std::regex_search`` over the GGUF tensor name, the first matching rule wins,
  and it overrides the layer's device for that tensor (input and output tensors too). Buffer names are the
  device buffer types': ``CUDA0``, ``CUDA1`` (``ROCm0`` under HIP, ``MUSA0``), ``Vulkan0``, ``SYCL0``; ``CPU``.
  On several GPUs the printed ``-ot`` form pins every block's tensors to its planned device, so the plan
  does not depend on how an engine rounds ``--tensor-split`` (ik_llama.cpp splits by bytes, not layers).
- **``--n-cpu-moe N``** depends on the flavour (`FLAVORS`): mainline keeps blocks ``0 .. N-1``'s experts on
  the CPU (``common/common.h``, ``llm_add_n_cpu_ffn_overrides``); ik_llama.cpp since build 4797 (commit
  da2293ded, PR 2262) keeps the LAST N expert blocks (those with ``ffn_down_exps``, MTP blocks never) on the
  CPU with one GPU in use, and on several GPUs with ``-sm layer`` shares N out per GPU by its own byte-based
  split, which a plan cannot pin: ik multi-GPU plans print the ``-ot`` form only. Each flavour's plan
  chooses its CPU blocks so that its own ``--n-cpu-moe`` moves exactly them.

    >>> plan = plan_devices(inspect_gguf("model.gguf"), [24 << 30, 12 << 30], flavor="llama.cpp")
    >>> plan.flags()["override_tensor"]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from moescope._units import format_bytes
from moescope.errors import UsageError
from moescope.gguf.inspect import GGUFModel, open_header
from moescope.gguf.plan import EXPS_REGEX, compute_allowances, kv_bytes_per_block

DEVICE_PREFIX = re.compile(r"^[A-Za-z][A-Za-z_]*$")
MAX_DEVICES = 16  # GGML_SCHED_MAX_BACKENDS less the CPU would be 15; llama.cpp's -ts takes 16 values


@dataclasses.dataclass(frozen=True)
class Flavor:
    """One engine's offload semantics.

    name : ``llama.cpp`` or ``ik_llama.cpp``; n_cpu_moe_flag : its short flag; cpu_moe_from : which expert
    blocks ``--n-cpu-moe N`` keeps on the CPU (``first``: blocks 0..N-1; ``last``: the last N expert
    blocks); exps_regex : the expert-tensor suffix its ``--n-cpu-moe`` matches; split : how ``-ts`` divides
    layers (``layers``: by count; ``bytes``: by weights + KV, ik); source : where upstream defines it.
    """

    name: str
    n_cpu_moe_flag: str
    cpu_moe_from: str
    exps_regex: str
    split: str
    source: str
    notes: tuple[str, ...] = ()

    def is_expert(self, name: str) -> bool:
        """Whether this flavour's expert rules move the tensor `name` (ik's leave expert biases with the layer)."""
        return name.startswith("blk.") and re.search(self.exps_regex, name) is not None


FLAVORS = {
    "llama.cpp": Flavor(
        "llama.cpp",
        "--n-cpu-moe",
        "first",
        EXPS_REGEX,
        "layers",
        "ggml-org/llama.cpp common/common.h llm_add_n_cpu_ffn_overrides (blocks 0..N-1); src/llama-model.cpp "
        "load_tensors get_layer_buft_list (-ts by layer count)",
    ),
    "ik_llama.cpp": Flavor(
        "ik_llama.cpp",
        "-ncmoe",
        "last",
        r"\.ffn_(up|down|gate|gate_up)_exps\.(weight|scale)",
        "bytes",
        "ikawrakow/ik_llama.cpp src/llama-load-tensors.cpp create_tensors_helper (-ncmoe: the last N expert "
        "blocks on one GPU, since build 4797, PR 2262; blocks 0..N-1 in builds 4325-4796); src/llama.cpp "
        "(-sm layer splits by bytes)",
        (
            "ik_llama.cpp offloads only the experts a batch uses by default (-no-ooae turns it off; -ooae is no "
            "longer accepted): it changes PCIe traffic, not where tensors live",
            "ik_llama.cpp reads tensors overridden to CPU into pinned memory without mmap (unless "
            "GGML_CUDA_NO_PINNED is set): count them in system RAM",
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class BlockBytes:
    """Bytes per trunk block (MTP blocks excluded), from the GGUF and the KV settings.

    dense, experts, kv : [n_trunk] int64, a block's non-expert tensors, routed-expert tensors (0 for a dense
    block) and KV cache; output : non-block tensors but the token embedding (output head, norms), which
    go with the output layer; moe_blocks : blocks with routed experts, ascending.
    """

    dense: np.ndarray
    experts: np.ndarray
    kv: np.ndarray
    output: int
    moe_blocks: tuple[int, ...]


def block_bytes(model: GGUFModel, ctx: int, kv_type: str, flavor: Flavor | None = None) -> BlockBytes:
    """Per-block bytes of `model` at context `ctx` and KV type `kv_type` (see `BlockBytes`); experts are the
    tensors the flavour's expert rules move (default: llama.cpp's)."""
    fl = flavor or FLAVORS["llama.cpp"]
    n = model.trunk_blocks
    dense = np.zeros(n, dtype=np.int64)
    experts = np.zeros(n, dtype=np.int64)
    output = 0
    for t in model.tensors:
        if t.mtp:
            continue
        if 0 <= t.block < n:
            (experts if t.per_expert and fl.is_expert(t.name) else dense)[t.block] += t.n_bytes
        elif t.block < 0 and not t.name.startswith("token_embd."):
            output += t.n_bytes
    kv = kv_per_block(model, ctx, kv_type)
    return BlockBytes(dense, experts, kv, output, tuple(b for b in model.layer_ids if experts[b] > 0))


def kv_per_block(model: GGUFModel, ctx: int, kv_type: str) -> np.ndarray:
    """[n_trunk] int64 KV-cache bytes per block (`moescope.gguf.plan.kv_bytes_per_block`): they sum to
    `kv_cache_bytes`."""
    return kv_bytes_per_block(model, open_header(model.path), ctx, kv_type)


@dataclasses.dataclass(frozen=True)
class DeviceLoad:
    """One GPU of a plan: its name, budget, the blocks whose layer it holds, the MoE blocks whose experts it
    holds, and its bytes (weights, KV cache, compute allowance, experts)."""

    name: str
    budget: int
    blocks: tuple[int, ...]
    expert_blocks: tuple[int, ...]
    weights: int
    kv_cache: int
    compute: int
    experts: int
    output: bool

    @classmethod
    def of(
        cls,
        bb: BlockBytes,
        name: str,
        budget: int,
        blocks: Sequence[int],
        kept: Sequence[int],
        compute: int,
        last: bool,
    ) -> DeviceLoad:
        """The load of a GPU holding `blocks`' layers and `kept` blocks' experts (the output layer if `last`)."""
        blocks, kept = list(blocks), list(kept)
        return cls(
            name,
            int(budget),
            tuple(blocks),
            tuple(kept),
            int(bb.dense[blocks].sum()) + (bb.output if last else 0),
            int(bb.kv[blocks].sum()),
            compute,
            int(bb.experts[kept].sum()),
            last,
        )

    @property
    def used(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.experts

    @property
    def free(self) -> int:
        return self.budget - self.used


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """An offload plan over `devices` (GPUs, in engine order) and the CPU.

    cpu_blocks / gpu_blocks : MoE blocks whose experts stay on the CPU / in VRAM; n_cpu_moe : the value of
    the flavour's ``--n-cpu-moe`` that moves exactly `cpu_blocks` (None on several GPUs with ik_llama.cpp);
    tensor_split : the ``-ts`` values (None on one GPU); rules : the ``-ot`` form, ``[(pattern, buffer)]``;
    n_layers_all : ``block_count`` (MTP blocks included), what the engine's layer split counts.
    """

    flavor: Flavor
    devices: tuple[DeviceLoad, ...]
    cpu_blocks: tuple[int, ...]
    gpu_blocks: tuple[int, ...]
    expert_layer_bytes: dict[int, int]
    n_cpu_moe: int | None
    tensor_split: tuple[float, ...] | None
    rules: tuple[tuple[str, str], ...]
    n_layers_all: int
    ctx: int
    kv_type: str
    ubatch: int
    notes: tuple[str, ...]

    @property
    def vram(self) -> int:
        return sum(d.budget for d in self.devices)

    @property
    def experts_in_vram(self) -> int:
        return sum(d.experts for d in self.devices)

    def block_device(self) -> dict[int, str]:
        """Trunk block -> the GPU holding its layer."""
        return {b: d.name for d in self.devices for b in d.blocks}

    def expert_device(self) -> dict[int, str]:
        """MoE block -> where its routed experts live (a GPU name or ``CPU``)."""
        out = {b: "CPU" for b in self.cpu_blocks}
        out.update({b: d.name for d in self.devices for b in d.expert_blocks})
        return out

    def ot_value(self) -> str | None:
        return ",".join(f"{p}={b}" for p, b in self.rules) or None

    def flags(self) -> dict[str, str]:
        """The plan as command-line flags, one string per equivalent form."""
        base = "-ngl 999"
        if self.tensor_split is not None:
            base += " -ts " + ",".join(_num(x) for x in self.tensor_split)
        out = {}
        if self.n_cpu_moe is not None:
            out["n_cpu_moe"] = f"{base} {self.flavor.n_cpu_moe_flag} {self.n_cpu_moe}"
        ot = self.ot_value()
        out["override_tensor"] = base + (f' -ot "{ot}"' if ot else "")
        return out

    def layer_buffers(self, model: GGUFModel) -> dict[str, str]:
        """Tensor name -> the buffer of its layer, where no rule moves it, for every tensor the engine loads
        (MTP blocks are not loaded): a block's on its GPU, the token embedding on the CPU (the input layer),
        other tensors on the last GPU (the output layer)."""
        layer = self.block_device()
        last = self.devices[-1].name
        return {
            t.name: layer[t.block] if t.block >= 0 else ("CPU" if t.name.startswith("token_embd.") else last)
            for t in model.tensors
            if not t.mtp
        }

    def placement(self, model: GGUFModel) -> dict[str, str]:
        """Tensor name -> planned buffer (a GPU name or ``CPU``) for every tensor the engine loads: its
        layer's (`layer_buffers`), the routed experts where the plan keeps them."""
        experts = self.expert_device()
        out = self.layer_buffers(model)
        for t in model.tensors:
            if t.name in out and t.per_expert and t.block in experts and self.flavor.is_expert(t.name):
                out[t.name] = experts[t.block]
        return out

    def to_dict(self, model: GGUFModel) -> dict[str, Any]:
        """The plan file's ``plan`` part: devices with bytes and tensors, the CPU's tensors, flags, rules."""
        where = self.placement(model)
        devices = []
        for d in self.devices:
            devices.append(
                {
                    "name": d.name,
                    "budget": d.budget,
                    "blocks": list(d.blocks),
                    "expert_blocks": list(d.expert_blocks),
                    "output_layer": d.output,
                    "bytes": {
                        "weights": d.weights,
                        "kv_cache": d.kv_cache,
                        "compute": d.compute,
                        "experts": d.experts,
                        "used": d.used,
                        "free": d.free,
                    },
                    "tensors": sorted(n for n, b in where.items() if b == d.name),
                }
            )
        cpu = sorted(n for n, b in where.items() if b == "CPU")
        sizes = {t.name: t.n_bytes for t in model.tensors}
        return {
            "flavor": self.flavor.name,
            "flavor_source": self.flavor.source,
            "devices": devices,
            "cpu": {"expert_blocks": list(self.cpu_blocks), "tensors": cpu, "bytes": sum(sizes[n] for n in cpu)},
            "gpu_blocks": list(self.gpu_blocks),
            "cpu_blocks": list(self.cpu_blocks),
            "n_cpu_moe": self.n_cpu_moe,
            "tensor_split": None if self.tensor_split is None else list(self.tensor_split),
            "rules": [list(r) for r in self.rules],
            "flags": self.flags(),
            "n_layers_all": self.n_layers_all,
            "ctx": self.ctx,
            "kv_type": self.kv_type,
            "ubatch": self.ubatch,
            "vram": self.vram,
            "experts_in_vram": self.experts_in_vram,
            "notes": list(self.notes),
        }


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def device_names(n: int, prefix: str = "CUDA") -> list[str]:
    """The engine's buffer names of `n` GPUs: ``CUDA0, CUDA1, ...`` (``Vulkan0``, ``ROCm0``, ``SYCL0`` ...)."""
    if not DEVICE_PREFIX.match(prefix):
        raise UsageError(
            f"--device-prefix {prefix!r}: expected the letters of the engine's device names, e.g. CUDA, ROCm, "
            f"Vulkan, SYCL (the names llama.cpp lists with --list-devices, without the number)"
        )
    return [f"{prefix}{i}" for i in range(n)]


def layer_devices(tensor_split: Sequence[float], n_layers_all: int, n_gpu_layers: int = 999) -> list[int]:
    """Device index of each layer ``0 .. n_layers_all`` (the last is the output layer; -1: the CPU), as
    llama.cpp's ``get_layer_buft_list`` computes it from ``-ngl`` and ``-ts`` (float32, as the source)."""
    splits = np.cumsum(np.asarray(tensor_split, dtype=np.float32), dtype=np.float32)
    splits = (splits / splits[-1]).astype(np.float32)
    start = max(n_layers_all + 1 - n_gpu_layers, 0)
    active = min(n_gpu_layers, n_layers_all + 1)
    out = []
    for il in range(n_layers_all + 1):
        if il < start or il - start >= active:
            out.append(-1)
        else:
            x = np.float32(il - start) / np.float32(active)
            out.append(min(int(np.searchsorted(splits, x, side="right")), len(splits) - 1))
    return out


def n_cpu_moe_blocks(model: GGUFModel, flavor: Flavor, n: int) -> tuple[int, ...]:
    """The MoE blocks whose experts the flavour's ``--n-cpu-moe n`` sends to the CPU on one GPU."""
    if flavor.cpu_moe_from == "first":
        return tuple(b for b in model.layer_ids if b < n)
    # ik: walking down from the last trunk block, the blocks that have blk.i.ffn_down_exps.weight
    names = {t.name for t in model.tensors}
    have = [b for b in range(model.trunk_blocks) if f"blk.{b}.ffn_down_exps.weight" in names]
    return tuple(sorted(have[::-1][:n]))


def n_cpu_moe_rules(flavor: Flavor, model: GGUFModel, n: int) -> list[tuple[str, str]]:
    """The overrides the flavour's ``--n-cpu-moe n`` adds on one GPU, one rule per block, in its order."""
    if flavor.cpu_moe_from == "first":
        return [(rf"blk\.{i}{flavor.exps_regex}", "CPU") for i in range(n)]
    return [(rf"blk\.{i}{flavor.exps_regex}", "CPU") for i in reversed(n_cpu_moe_blocks(model, flavor, n))]


def block_alternation(blocks: Sequence[int]) -> str:
    """[1, 2, 5] -> "1|2|5", the block numbers of a rule's alternation."""
    return "|".join(str(b) for b in blocks)


def plan_devices(
    model: GGUFModel,
    budgets: Sequence[int],
    *,
    flavor: str = "llama.cpp",
    prefix: str = "CUDA",
    ctx: int = 4096,
    kv_type: str = "f16",
    compute: int | None = None,
    ubatch: int = 512,
    prefill_use: dict[int, float] | None = None,
) -> DevicePlan:
    """Place `model` on GPUs with `budgets` bytes each (engine order) and the CPU.

    Every block's layer (non-expert weights, KV cache) goes to a GPU, blocks in order, the first GPU first
    (contiguous ranges, as the engines split layers); the output layer to the last GPU. Routed experts stay
    with their block's GPU unless they do not fit: then whole MoE layers' experts go to the CPU, chosen by
    the flavour's ``--n-cpu-moe`` convention (llama.cpp: the first blocks; ik_llama.cpp: the last), the
    fewest that let every GPU hold its share. Each GPU reserves `compute`
    (`moescope.gguf.plan.compute_allowances`). Packing blocks greedily in order is optimal for
    feasibility: giving each GPU as many blocks as fit leaves the least for the ones after it.

    Then the boundaries between GPUs move to where the GPUs keep the most expert bytes together (the packing
    leaves the last GPU slack), and on each GPU the experts it keeps are chosen among its blocks
    (`choose_experts`): the most
    expert bytes that fit (decode reads top-k experts of every layer per token, so each byte kept in VRAM
    saves the same decode time), which differs from the convention when layers differ in bytes (mixed
    quant types); among equal choices, the layers with the most distinct experts per ubatch
    (`prefill_use`, MoE block -> experts, measured on a trace: what prefill streams over PCIe for a
    CPU-resident layer), else the convention's layers. When the result is not the flavour's convention,
    ``--n-cpu-moe`` cannot express it and only the ``-ot`` form is printed.

    Raises
    ------
    UsageError : an unknown flavour, no budget, or GPUs that do not hold even the non-expert layers.
    """
    if flavor not in FLAVORS:
        raise UsageError(f"--flavor {flavor!r}: expected one of {', '.join(FLAVORS)}")
    fl = FLAVORS[flavor]
    if not budgets or len(budgets) > MAX_DEVICES:
        raise UsageError(f"--vram has {len(budgets)} budgets; expected 1 to {MAX_DEVICES}, one per GPU in order")
    if ctx < 1:
        raise UsageError(f"--ctx {ctx}: expected a positive context length")
    names = device_names(len(budgets), prefix)
    bb = block_bytes(model, ctx, kv_type, fl)  # refuses an unknown --kv-type
    computes = compute_allowances(model, len(budgets), compute, ubatch)
    moe = list(bb.moe_blocks)
    if fl.cpu_moe_from == "last":
        moe = moe[::-1]
    packed = None
    for cut in range(len(moe) + 1):
        cpu = set(moe[:cut])
        w = bb.dense + bb.kv + np.where([b not in cpu for b in range(len(bb.dense))], bb.experts, 0)
        packed = _pack(w, [b - c for b, c in zip(budgets, computes, strict=True)], bb.output)
        if packed is not None:
            break
    if packed is None:
        layers = int((bb.dense + bb.kv).sum()) + bb.output
        who = (
            f"{format_bytes(budgets[0])} of VRAM does"
            if len(budgets) == 1
            else f"{len(budgets)} GPUs with {' + '.join(format_bytes(b) for b in budgets)} do"
        )
        raise UsageError(
            f"{who} not hold even the non-expert layers ({format_bytes(layers)}: weights and KV cache at ctx "
            f"{ctx}, {kv_type}) besides "
            f"{format_bytes(sum(computes))} of compute buffers; lower --ctx, use --kv-type q8_0, or run all on CPU"
        )
    order = list(bb.moe_blocks)[:: -1 if fl.cpu_moe_from == "first" else 1]  # the convention keeps these first
    rank = {b: i for i, b in enumerate(order)}
    nd = len(budgets)
    use = prefill_use or {}
    moe_set = set(bb.moe_blocks)
    conv_cpu = set(cpu)  # the convention's CPU blocks, from the packing

    def keep(d: int, blocks: list[int]) -> tuple[list[int], int, float] | None:
        """The experts GPU `d` keeps among `blocks` (None: the blocks' layers alone do not fit)."""
        room = budgets[d] - computes[d] - int((bb.dense + bb.kv)[blocks].sum()) - (bb.output if d == nd - 1 else 0)
        if room < 0:
            return None
        here = [b for b in blocks if b in moe_set]
        kept = choose_experts(room, {b: int(bb.experts[b]) for b in here}, {b: use.get(b, 0.0) for b in here}, rank)
        conv = [b for b in here if b not in conv_cpu]
        size = sum(int(bb.experts[b]) for b in kept)
        if not use and sum(int(bb.experts[b]) for b in conv) == size:
            kept = conv  # equal bytes and nothing measured: keep the convention's layers
        return kept, size, sum(use.get(b, 0.0) for b in kept)

    def score(bounds: list[int]) -> tuple[tuple[int, float], list[list[int]]] | None:
        chosen, total, value = [], 0, 0.0
        for d in range(nd):
            k = keep(d, list(range(bounds[d], bounds[d + 1])))
            if k is None:
                return None
            chosen.append(k[0])
            total += k[1]
            value += k[2]
        return (total, value), chosen

    # the packing's ranges, then each boundary moved to where the GPUs together keep the most expert bytes
    # (coordinate ascent; the packing leaves the last GPUs slack that a shifted boundary can fill)
    bounds = [0]
    for blocks in packed:
        bounds.append(bounds[-1] + len(blocks))
    best = score(bounds)
    assert best is not None  # the packing fits
    for _ in range(4 * nd):
        improved = False
        for i in range(1, nd):
            for pos in range(bounds[i - 1], bounds[i + 1] + 1):
                trial = [*bounds[:i], pos, *bounds[i + 1 :]]
                got = score(trial)
                if got is not None and got[0] > best[0]:
                    best, bounds, improved = got, trial, True
        if not improved:
            break
    kept_by_device = best[1]
    cpu = moe_set - {b for kept in kept_by_device for b in kept}
    devices = [
        DeviceLoad.of(bb, name, budgets[i], range(bounds[i], bounds[i + 1]), kept, computes[i], i == nd - 1)
        for i, (name, kept) in enumerate(zip(names, kept_by_device, strict=True))
    ]
    cpu_blocks = tuple(sorted(cpu))
    notes = list(fl.notes)
    n_all = model.n_blocks
    tensor_split = None
    if len(budgets) > 1:
        counts = [len(d.blocks) for d in devices]
        counts[-1] += n_all - model.trunk_blocks + 1  # the MTP blocks and the output layer count too
        if fl.split == "layers":
            tensor_split = tuple(float(c) for c in counts)
        else:  # ik splits by bytes (weights + KV, experts counted as on the GPU): the planned layer bytes
            sizes = [
                int((bb.dense + bb.kv + bb.experts)[list(d.blocks)].sum()) + (bb.output if d.output else 0)
                for d in devices
            ]
            tensor_split = tuple(round(s / 2**20, 2) for s in sizes)
            notes.append(
                "ik_llama.cpp splits layers by bytes with its own compute estimate: -ts is this plan's bytes "
                "per GPU in MiB, and the -ot rules pin every block's tensors to its GPU whatever the split; "
                "each layer's KV cache follows ik's split"
            )
    gpu_blocks = tuple(b for b in bb.moe_blocks if b not in cpu)
    n_cpu_moe: int | None = None
    conventional = cpu_blocks == n_cpu_moe_blocks(
        model, fl, (cpu_blocks[-1] + 1 if cpu_blocks else 0) if fl.cpu_moe_from == "first" else len(cpu_blocks)
    )
    if not conventional:
        notes.append(
            f"the experts kept in VRAM are not the {'last' if fl.cpu_moe_from == 'first' else 'first'} layers "
            f"{fl.n_cpu_moe_flag} keeps (layers differ in bytes, or a trace ranked them by prefill use): "
            f"only the -ot form places them"
        )
    elif fl.cpu_moe_from == "first":
        n_cpu_moe = 0 if not cpu_blocks else cpu_blocks[-1] + 1
        if model.leading_dense_blocks and cpu_blocks:
            notes.append(f"--n-cpu-moe counts the {model.leading_dense_blocks} leading dense block(s) too")
    elif len(budgets) == 1:
        n_cpu_moe = len(cpu_blocks)
        notes.append(
            "-ncmoe N keeps the LAST N expert blocks on the CPU in ik_llama.cpp builds from 4797 (PR 2262); "
            "older builds (4325-4796) keep blocks 0..N-1: use the -ot form there"
        )
    else:
        notes.append(
            "ik_llama.cpp's -ncmoe on several GPUs shares N out by its own byte split (-sm layer): only the "
            "-ot form pins this plan"
        )
    rules = []
    if cpu_blocks:
        rules.append((rf"blk\.({block_alternation(cpu_blocks)}){fl.exps_regex}", "CPU"))
    if len(budgets) > 1:
        rules += [(rf"blk\.({block_alternation(d.blocks)})\.", d.name) for d in devices if d.blocks]
    return DevicePlan(
        fl,
        tuple(devices),
        cpu_blocks,
        gpu_blocks,
        {b: int(bb.experts[b]) for b in bb.moe_blocks},
        n_cpu_moe,
        tensor_split,
        tuple(rules),
        n_all,
        ctx,
        kv_type,
        ubatch,
        tuple(notes),
    )


MAX_CHOICES = 2_000_000  # count vectors `choose_experts` enumerates before it falls back to a greedy choice


def choose_experts(room: int, sizes: dict[int, int], value: dict[int, float], rank: dict[int, int]) -> list[int]:
    """The MoE blocks whose experts one GPU keeps: the most bytes within `room` (0/1 knapsack, exact), then
    the most `value`, then the lowest `rank` (the convention's order).

    Blocks of equal size are interchangeable for the bytes, so the search enumerates how many of each size
    to keep (the best of a size by value, then rank), not subsets: a few quant types give a few sizes. Past
    `MAX_CHOICES` count vectors it keeps the largest blocks first (greedy), which is exact for equal sizes.
    """
    groups: dict[int, list[int]] = {}
    for b, n in sizes.items():
        groups.setdefault(n, []).append(b)
    for members in groups.values():
        members.sort(key=lambda b: (-value.get(b, 0.0), rank.get(b, 0)))
    keys = sorted(groups, reverse=True)
    n_vectors = 1
    for k in keys:
        n_vectors *= len(groups[k]) + 1
    if n_vectors > MAX_CHOICES:
        kept, used = [], 0
        for k in keys:
            for b in groups[k]:
                if used + k <= room:
                    kept.append(b)
                    used += k
        return sorted(kept)
    best: tuple[int, float, int] | None = None
    best_counts: tuple[int, ...] = ()

    def walk(i: int, used: int, val: float, rk: int, counts: tuple[int, ...]) -> None:
        nonlocal best, best_counts
        if i == len(keys):
            score = (used, val, -rk)
            if best is None or score > best:
                best, best_counts = score, counts
            return
        members = groups[keys[i]]
        v, r = 0.0, 0
        for c in range(len(members) + 1):
            if c:
                v += value.get(members[c - 1], 0.0)
                r += rank.get(members[c - 1], 0)
            if used + c * keys[i] > room:
                break
            walk(i + 1, used + c * keys[i], val + v, rk + r, (*counts, c))

    walk(0, 0, 0.0, 0, ())
    return sorted(b for k, c in zip(keys, best_counts, strict=True) for b in groups[k][:c])


def _pack(weights: np.ndarray, capacity: Sequence[int], output: int) -> list[list[int]] | None:
    """Contiguous ranges of blocks per device, each as long as fits, the last device also holding `output`;
    None when the blocks do not all fit."""
    out: list[list[int]] = [[] for _ in capacity]
    b, n = 0, len(weights)
    for d, cap in enumerate(capacity):
        room = cap - (output if d == len(capacity) - 1 else 0)
        if room < 0:
            return None
        used = 0
        while b < n and used + int(weights[b]) <= room:
            used += int(weights[b])
            out[d].append(b)
            b += 1
    return out if b == n else None


def check_split(plan: DevicePlan) -> bool | None:
    """Whether the plan's ``-ts`` values put each block's layer on its planned GPU under llama.cpp's rule
    (`layer_devices`); None on one GPU (no ``-ts``) and for a flavour that splits by bytes (ik_llama.cpp:
    its rule needs its own compute estimate, so that plan pins every block with ``-ot`` instead)."""
    if plan.tensor_split is None:
        return None
    if plan.flavor.split != "layers":
        return None
    got = layer_devices(plan.tensor_split, plan.n_layers_all)
    index = {d.name: i for i, d in enumerate(plan.devices)}
    want = plan.block_device()
    return all(got[b] == index[want[b]] for b in want) and got[-1] == len(plan.devices) - 1


def form_placement(plan: DevicePlan, model: GGUFModel, rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Where a form puts each loaded tensor, in Python: the first matching rule (``re.search``, as the
    engines' ``std::regex_search`` on these patterns), else its layer's device (the plan's own split)."""
    compiled = [(re.compile(p), b) for p, b in rules]
    return {
        name: next((b for p, b in compiled if p.search(name)), home) for name, home in plan.layer_buffers(model).items()
    }


def forms_agree(plan: DevicePlan, model: GGUFModel) -> bool:
    """Whether every printed form puts every tensor where the plan says (Python regex semantics; `verify`
    checks the same in llama.cpp)."""
    want = plan.placement(model)
    forms = [list(plan.rules)]
    if plan.n_cpu_moe is not None:
        forms.append(n_cpu_moe_rules(plan.flavor, model, plan.n_cpu_moe))
    return all(form_placement(plan, model, r) == want for r in forms) and check_split(plan) is not False
