"""What llama.cpp's automatic ``--fit`` would choose for an offload, as a baseline beside moescope's plan.

llama.cpp's ``--fit`` (``common/fit.cpp``, ``common_fit_params``; on by default, off when ``-ngl``, ``-ts``
or ``-ot`` are given) measures buffers by loading the model and then moves weights to system memory. This
module applies its rule for MoE models to `moescope.gguf.offload`'s byte accounting, so that the two plans
are compared under the same accounting; it does not run llama.cpp.

    >>> fit = fit_baseline(inspect_gguf("model.gguf"), [24 << 30, 12 << 30])
"""

from __future__ import annotations

from collections.abc import Sequence

from moescope._units import format_bytes
from moescope.gguf.inspect import GGUFModel
from moescope.gguf.offload import (
    FLAVORS,
    DeviceLoad,
    DevicePlan,
    block_alternation,
    block_bytes,
    device_names,
)
from moescope.gguf.plan import compute_allowances

FIT_MARGIN = 1024 * 2**20  # llama.cpp --fit-target default per device (common/common.h fit_params_target)
FIT_EXPS_REGEX = r"\.ffn_(up|down|gate_up|gate)_(ch|)exps"  # common/fit.cpp get_overflow_pattern (MOE)


def fit_baseline(
    model: GGUFModel,
    budgets: Sequence[int],
    *,
    prefix: str = "CUDA",
    ctx: int = 4096,
    kv_type: str = "f16",
    compute: int | None = None,
    ubatch: int = 512,
    margin: int = FIT_MARGIN,
) -> DevicePlan | None:
    """What llama.cpp's automatic ``--fit`` (``common/fit.cpp``, ``common_fit_params``; on by default, off
    when ``-ngl``, ``-ts`` or ``-ot`` are given) would choose, under its rule with this module's accounting.

    Its rule for MoE models: every device keeps `margin` free (``--fit-target``, 1 GiB); layers are first
    filled from the last device backwards with their experts on the CPU, then, front to back, each device
    takes as many full layers (experts on the GPU) as fit, the layers after them staying with their experts
    on the CPU, so within each device's range the experts of the HIGHEST layers stay on the CPU (on one
    GPU: the last layers'). Modelled as whole layers:
    the fit's one extra partial layer (its up / gate tensors on the next buffer) and its context reduction
    (only when ``-c`` is not given; here the context is given) are not. The fit measures buffers by
    loading the model; this uses the same byte accounting as the plan it stands beside, plus the margin.
    None when even that does not fit (the fit would then fail and llama.cpp load with its defaults).
    """
    names = device_names(len(budgets), prefix)
    bb = block_bytes(model, ctx, kv_type)
    computes = [c + margin for c in compute_allowances(model, len(budgets), compute, ubatch)]
    caps = [b - c for b, c in zip(budgets, computes, strict=True)]
    n, nd = len(bb.dense), len(budgets)
    light = bb.dense + bb.kv
    full = light + bb.experts
    room = [c - (bb.output if d == nd - 1 else 0) for d, c in enumerate(caps)]

    def fits_light(j: int, d: int) -> bool:  # blocks j.. with experts on the CPU, back to front on devices d..
        top = n
        for e in range(nd - 1, d - 1, -1):
            used = 0
            while top > j and used + int(light[top - 1]) <= room[e]:
                top -= 1
                used += int(light[top])
        return top <= j

    if not fits_light(0, 0):
        return None
    # front to back: each device takes the most full layers it can, then the fewest layers with experts on
    # the CPU that leave the rest placeable on the devices after it (the last device takes all the rest)
    ranges: list[list[int]] = []
    cpu: set[int] = set()
    nxt = 0
    for d in range(nd):
        if d == nd - 1:
            blocks, used = list(range(nxt, n)), int(light[nxt:].sum())
            for b in blocks:
                if used + int(bb.experts[b]) > room[d]:
                    cpu.update(x for x in blocks[blocks.index(b) :] if x in bb.moe_blocks)
                    break
                used += int(bb.experts[b])
            ranges.append(blocks)
            break
        best = None
        for f in range(n - nxt, -1, -1):
            used_f = int(full[nxt : nxt + f].sum())
            if used_f > room[d]:
                continue
            for p_ in range(n - nxt - f + 1):
                if used_f + int(light[nxt + f : nxt + f + p_].sum()) > room[d]:
                    break
                if fits_light(nxt + f + p_, d + 1):
                    best = (f, p_)
                    break
            if best:
                break
        f, p_ = best or (0, 0)
        ranges.append(list(range(nxt, nxt + f + p_)))
        cpu.update(b for b in range(nxt + f, nxt + f + p_) if b in bb.moe_blocks)
        nxt += f + p_
    devices = [
        DeviceLoad.of(
            bb,
            name,
            budget,
            blocks,
            [b for b in blocks if b in bb.moe_blocks and b not in cpu],
            computes[i],
            i == len(names) - 1,
        )
        for i, (name, budget, blocks) in enumerate(zip(names, budgets, ranges, strict=True))
    ]
    cpu_blocks = tuple(sorted(cpu))
    counts = [len(r) for r in ranges]
    counts[-1] += model.n_blocks - model.trunk_blocks + 1
    rules = [(rf"blk\.({block_alternation(cpu_blocks)}){FIT_EXPS_REGEX}", "CPU")] if cpu_blocks else []
    return DevicePlan(
        FLAVORS["llama.cpp"],
        tuple(devices),
        cpu_blocks,
        tuple(b for b in bb.moe_blocks if b not in cpu),
        {b: int(bb.experts[b]) for b in bb.moe_blocks},
        None,
        tuple(float(c) for c in counts) if len(budgets) > 1 else None,
        tuple(rules),
        model.n_blocks,
        ctx,
        kv_type,
        ubatch,
        (
            f"llama.cpp --fit keeps {format_bytes(margin)} free per device (--fit-target) and sends the "
            f"experts of each device's highest layers to the CPU; whole layers modelled (not its one partial layer)",
        ),
    )
