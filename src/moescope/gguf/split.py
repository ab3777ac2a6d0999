"""Split a GGUF MoE model into G GGUFs, each holding a subset of every MoE layer's experts.

Planning (`plan_groups`) chooses, per MoE block, which experts each group keeps (the subsets may differ
per layer; rankings are per layer, never pooled by id across layers):

- ``contiguous``: expert ranges 0..E/G-1, E/G..2E/G-1, ...;
- ``balanced``: by load (a ranking's counts): heaviest first to the lightest group with room (LPT), so the
  groups carry near-equal routing mass;
- ``ranked``: a snake draft down each layer's ranking (hottest to group 0, 1, ..., G-1, then G-1, ..., 0);
- ``custom``: a JSON file ``{"groups": [{"<block>": [experts...], ...}, ...]}`` (one dict per group).

``core=N`` puts each layer's N hottest experts into every group and drafts the rest.

Writing (`split_gguf`) slices every per-expert tensor along the expert dimension (``*_exps`` weights, merged
``ffn_gate_up_exps``, per-expert biases and scales), gathers the router rows (``ffn_gate_inp`` and its bias,
``exp_probs_b``), sets ``expert_count`` to the group's size, lowers ``expert_used_count`` to at most that,
rewrites ``expert_group_count`` / ``expert_group_used_count`` so the part routes sanely and loads in
llama.cpp (`part_groups`: the source's groups where the part keeps whole groups, else grouping off), gives
MTP / NextN blocks the experts of the last MoE block (`mtp_note`), and copies everything else untouched. A
``split.json`` manifest maps each group's new expert ids back to the model's and says, per part, what had
to change. Every layer of one output must keep the same number of experts (``expert_count`` is one value).
The output is one folder holding the parts and the manifest, committed with one rename (`split_gguf`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope import _atomic
from moescope.analyze.ranking import read_groups_file
from moescope.errors import UsageError
from moescope.gguf.inspect import GGUFModel, field, inspect_gguf, open_gguf
from moescope.gguf.writer import TensorOut, encode_kv, write_gguf

MODES = ("contiguous", "balanced", "ranked", "custom")
MANIFEST = "split.json"  # beside the parts in the output folder
_ROUTER_ROWS = re.compile(r"^blk\.(\d+)\.(ffn_gate_inp\.(weight|bias)|exp_probs_b\.bias)$")

Groups = list[dict[int, list[int]]]  # group -> MoE block -> expert ids kept (their order = new ids)


@dataclasses.dataclass(frozen=True)
class SplitResult:
    """The written files (one per group), the groups, and the manifest's path."""

    paths: tuple[Path, ...]
    groups: Groups
    manifest: Path
    bytes_written: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": [str(p) for p in self.paths],
            "manifest": str(self.manifest),
            "bytes_written": self.bytes_written,
            "groups": [{str(b): e for b, e in g.items()} for g in self.groups],
        }


def _sizes(n: int, g: int) -> list[int]:
    return [n // g + (1 if i < n % g else 0) for i in range(g)]


def plan_groups(
    model: GGUFModel,
    n_groups: int,
    mode: str,
    *,
    ranking: Any | None = None,
    custom: str | Path | None = None,
    core: int = 0,
) -> Groups:
    """Expert subsets per group and MoE block (see the module docstring).

    Parameters
    ----------
    model : the source's layout (`inspect_gguf`).
    n_groups : G, outputs to write.
    mode : one of `MODES`.
    ranking : a `moescope.analyze.Ranking` with one row per MoE block (needed by balanced, ranked, core).
    custom : the JSON file of the custom mode.
    core : experts per layer replicated into every group (the hottest, by the ranking).
    """
    e, blocks = model.n_experts, model.layer_ids
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "custom":
        if custom is None:
            raise UsageError("--mode custom needs --groups-file FILE.json (see `moescope split --help`)")
        groups = read_groups_file(custom)
    else:
        if not isinstance(n_groups, int) or n_groups < 1:
            raise UsageError(f"--groups {n_groups!r}: expected a whole number >= 1")
        if core < 0 or core >= e:
            raise UsageError(f"--core {core}: expected 0 <= N < {e} (the model has {e} experts per layer)")
        if n_groups > e - core:
            raise UsageError(
                f"--groups {n_groups} is more than the {e - core} experts per layer left to share out"
                + (f" after --core {core}" if core else "")
                + "; use fewer groups"
            )
        needs_ranking = mode in ("balanced", "ranked") or core > 0
        order = _orders(model, ranking) if needs_ranking else {b: np.arange(e) for b in blocks}
        groups = [{} for _ in range(n_groups)]
        for b in blocks:
            hot = order[b]
            shared = [int(x) for x in hot[:core]]
            rest = [int(x) for x in hot[core:]] if needs_ranking else [x for x in range(e) if x not in shared]
            parts = _share(rest, n_groups, mode, None if ranking is None else _loads(ranking, b))
            for g in range(n_groups):
                groups[g][b] = sorted(shared + parts[g])
    _check_groups(groups, model)
    return groups


def _orders(model: GGUFModel, ranking: Any | None) -> dict[int, np.ndarray]:
    if ranking is None:
        raise UsageError(
            "this mode needs a per-layer ranking: pass --ranking ranking.csv (from `moescope rank TRACE -o`)"
        )
    ids = [int(x) for x in ranking.layer_ids]
    missing = [b for b in model.layer_ids if b not in ids]
    if missing:
        raise UsageError(
            f"the ranking covers layers {ids} but the model's MoE blocks {missing} are not among them; rank a trace "
            f"captured from this model (its layer ids are the blk.N numbers)"
        )
    if ranking.order.shape[1] != model.n_experts:
        raise UsageError(
            f"the ranking ranks {ranking.order.shape[1]} experts per layer but the model has {model.n_experts}; "
            f"rank a trace of this model"
        )
    return {b: ranking.order[ids.index(b)] for b in model.layer_ids}


def _loads(ranking: Any, block: int) -> np.ndarray:
    i = [int(x) for x in ranking.layer_ids].index(block)
    return np.asarray(ranking.counts[i], dtype=np.float64)


def _share(experts: list[int], g: int, mode: str, load: np.ndarray | None) -> list[list[int]]:
    """Deal `experts` (hottest first for ranked/balanced) into g groups of near-equal size."""
    sizes = _sizes(len(experts), g)
    if mode == "contiguous":
        out, a = [], 0
        for s in sizes:
            out.append(experts[a : a + s])
            a += s
        return out
    out = [[] for _ in range(g)]
    if mode == "ranked":
        seq: list[int] = []
        while len(seq) < len(experts):  # 0, 1, ..., g-1, g-1, ..., 0, 0, 1, ...
            seq.extend(range(g) if (len(seq) // g) % 2 == 0 else range(g - 1, -1, -1))
        for x, gi in zip(experts, seq, strict=False):
            while len(out[gi]) >= sizes[gi]:  # an uneven last round: the next group with room
                gi = (gi + 1) % g
            out[gi].append(x)
        return out
    assert load is not None  # balanced: LPT on load, groups capped at their size
    mass = np.zeros(g)
    for x in sorted(experts, key=lambda x: (-load[x], x)):
        room = [i for i in range(g) if len(out[i]) < sizes[i]]
        gi = min(room, key=lambda i: (mass[i], i))
        out[gi].append(x)
        mass[gi] += load[x]
    return out


def _check_groups(groups: Groups, model: GGUFModel) -> None:
    e = model.n_experts
    for gi, g in enumerate(groups):
        missing = [b for b in model.layer_ids if b not in g]
        extra = [b for b in g if b not in model.layer_ids]
        if missing or extra:
            raise UsageError(
                f"group {gi} gives experts for blocks {sorted(g)} but the model's MoE blocks are "
                f"{list(model.layer_ids)}; give every MoE block, and only those"
            )
        sizes = {len(v) for v in g.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise UsageError(
                f"group {gi} keeps {sorted(sizes)} experts across layers; a GGUF has one expert_count, so every "
                f"layer of a group must keep the same (non-zero) number of experts"
            )
        for b, v in g.items():
            bad = [x for x in v if not 0 <= x < e]
            if bad or len(set(v)) != len(v):
                raise UsageError(
                    f"group {gi} block {b}: experts {v} "
                    + (f"name {bad}, outside 0..{e - 1}" if bad else "repeat an expert")
                    + "; fix the groups or the ranking"
                )


def subset_tensors(model: GGUFModel, reader: Any, keep: Mapping[int, Sequence[int]]) -> list[TensorOut]:
    """The output tensor list for one group: per-expert tensors and router rows gathered, the rest copied."""
    by_name = {t.name: t for t in reader.tensors}
    keep = {**keep, **{b: keep[model.layer_ids[-1]] for b in model.mtp_blocks}}  # see `mtp_note`
    out = []
    for info in model.tensors:
        t = by_name[info.name]
        gather = info.block in keep and (info.per_expert or _ROUTER_ROWS.match(info.name))
        if gather and info.shape[-1] == model.n_experts:
            take = tuple(int(x) for x in keep[info.block])
            shape = (*info.shape[:-1], len(take))
            out.append(
                TensorOut(info.name, shape, int(t.tensor_type), int(t.data_offset), info.n_bytes, take, model.n_experts)
            )
        else:
            out.append(TensorOut(info.name, info.shape, int(t.tensor_type), int(t.data_offset), info.n_bytes))
    return out


def mtp_note(model: GGUFModel) -> list[str]:
    """What happens to MTP / NextN blocks (not routed in normal decoding, so not in the groups): they keep the
    experts the group keeps in the last MoE block, so every expert tensor matches the part's expert_count and
    the part loads with or without llama.cpp's MTP head."""
    if not model.mtp_blocks:
        return []
    return [
        f"MTP block(s) {list(model.mtp_blocks)} keep the experts of block {model.layer_ids[-1]} (no routing is "
        f"recorded for them); the part's MTP head is a stand-in, not a draft model to rely on"
    ]


def _kv_changes(model: GGUFModel, reader: Any, keep: Mapping[int, Sequence[int]]) -> tuple[dict[str, bytes], list[str]]:
    """New metadata for a group keeping ``keep[block]`` experts per MoE block, and notes on what changed."""
    from gguf import Keys

    count_key, used_key, group_key, group_used_key = (
        k.format(arch=model.architecture)
        for k in (Keys.LLM.EXPERT_COUNT, Keys.LLM.EXPERT_USED_COUNT, Keys.LLM.EXPERT_GROUP_COUNT,
                  Keys.LLM.EXPERT_GROUP_USED_COUNT)
    )  # fmt: skip
    size = len(next(iter(keep.values())))
    notes: list[str] = []
    changes: dict[str, bytes] = {}

    def change(key: str, value: Any) -> None:
        f = reader.fields[key]
        vtype = int(f.types[0])
        changes[key] = encode_kv(key, 9, value, int(f.types[1])) if vtype == 9 else encode_kv(key, vtype, value)

    change(count_key, size)
    used = field(reader, used_key)
    if isinstance(used, list):
        new = [min(int(u), size) for u in used]
        if new != used:
            notes.append(f"expert_used_count lowered to at most {size} per layer")
        change(used_key, new)
        top_k = max(new, default=0)
    else:
        top_k = min(int(used or 0), size)
        if used is not None and int(used) > size:
            notes.append(f"expert_used_count lowered from {used} to {size}")
            change(used_key, size)
    n_group, n_used = field(reader, group_key), field(reader, group_used_key)
    if n_group is not None and int(n_group) > 1:
        groups, used_groups, why = part_groups(model.n_experts, int(n_group), int(n_used or 0), keep, top_k)
        if (groups, used_groups) != (int(n_group), int(n_used or 0)):
            notes.append(
                f"expert_group_count {n_group} -> {groups}, expert_group_used_count {n_used} -> {used_groups}: {why}"
            )
        change(group_key, groups)
        if group_used_key in reader.fields:
            change(group_used_key, used_groups)
    return changes, notes + mtp_note(model)


def part_groups(
    n_experts: int, n_group: int, n_used: int, keep: Mapping[int, Sequence[int]], top_k: int
) -> tuple[int, int, str]:
    """Grouped routing (DeepSeek-V3, GLM-4.5: pick `n_used` of `n_group` expert groups, then top-k inside
    them) for a part keeping ``keep[block]`` experts: ``(group count, used group count, why)``.

    The part keeps the source's rule where it can: when, in every MoE block, the kept experts are whole
    source groups (all ``E / n_group`` members of each group present, in order), the part has those groups
    and the same number of used groups. Otherwise grouped routing is turned off (one group): the source's
    groups do not exist in the part. Also off when the part would use all its groups (the same as no
    grouping; llama.cpp requires fewer used groups than groups) or when the used groups could hold fewer
    than top-k experts. Every result meets llama.cpp's load-time checks (``llama-model.cpp``): group count
    below the expert count and dividing it, and 0 < used groups < groups when there is more than one group.
    """
    size = len(next(iter(keep.values())))
    per = n_experts // n_group if n_experts % n_group == 0 else 0
    counts = set()
    for ids in keep.values():
        ids = list(ids)
        whole = per > 0 and len(ids) % per == 0 and sorted(ids) == ids
        whole = whole and all(
            ids[i : i + per] == list(range(ids[i], ids[i] + per)) and ids[i] % per == 0 for i in range(0, len(ids), per)
        )
        counts.add(len(ids) // per if whole else 0)
    groups = counts.pop() if len(counts) == 1 else 0
    if groups == 0:
        return 1, 1, "the part's experts are not whole source groups in every layer, so grouped routing is off"
    if groups <= 1 or n_used >= groups:
        return (
            1,
            1,
            (
                f"the part keeps {groups} whole group(s) and the source uses {n_used}: all of them, the same "
                f"as no grouping, so grouped routing is off"
            ),
        )
    if n_used * (size // groups) < top_k:
        return 1, 1, f"{n_used} used group(s) of {size // groups} experts hold fewer than top-k {top_k}: grouping off"
    return groups, n_used, f"the part keeps {groups} whole source groups of {size // groups} experts"


def output_paths(model_path: Path, out_dir: Path, n_groups: int) -> list[Path]:
    stem = model_path.name[:-5] if model_path.name.endswith(".gguf") else model_path.name
    return [out_dir / f"{stem}.group-{g + 1}-of-{n_groups}.gguf" for g in range(n_groups)]


def check_out_dir(out_dir: str | Path, overwrite: bool, inputs: Sequence[str | Path | None] = ()) -> Path:
    """Refuse an output folder `split_gguf` may not write (before any work): an existing file, a folder that is
    not empty nor (with `overwrite`) an earlier split output, a missing parent, or one of `inputs` (or a folder
    inside or around one)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} exists and is not a folder; give a folder for the parts")
    return _atomic.check_output(out, overwrite, kind=_atomic.SPLIT_OUTPUT, inputs=inputs)


def split_gguf(
    model_path: str | Path,
    out_dir: str | Path,
    groups: Groups,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SplitResult:
    """Write the folder `out_dir`: one GGUF per group (``<model>.group-<g>-of-<G>.gguf``) and ``split.json``.

    The parts and the manifest are written into one hidden temporary folder beside `out_dir`, which is renamed
    into place in one step: the folder appears complete or not at all, and a killed run leaves the old folder
    (or nothing) plus a temporary the next run deletes. `out_dir` may be missing (its parent must exist), an
    empty folder, or with `overwrite` an earlier split output (which is replaced whole); any other folder is
    refused, as is a folder holding the model.
    """
    src = Path(model_path)
    model = inspect_gguf(src)
    _check_groups(groups, model)
    out = check_out_dir(out_dir, overwrite, [src])
    paths = output_paths(src, out, len(groups))
    reader = open_gguf(src)
    plans = [(subset_tensors(model, reader, g), *_kv_changes(model, reader, g)) for g in groups]
    total = sum(t.n_bytes for tensors, _, _ in plans for t in tensors)
    written, done = 0, 0
    new_dir = _atomic.temp_sibling(out)
    new_dir.mkdir()
    try:
        for (tensors, changes, _), p in zip(plans, paths, strict=True):
            base = done

            def step(d: int, _t: int, base: int = base) -> None:
                if progress:
                    progress(base + d, total)

            written += write_gguf(reader, new_dir / p.name, tensors, changes, step)
            done += sum(t.n_bytes for t in tensors)
        doc = {
            "source": str(src),
            "architecture": model.architecture,
            "n_experts": model.n_experts,
            "groups": [
                {
                    "file": p.name,
                    "experts": {str(b): v for b, v in g.items()},
                    "notes": notes,
                }
                for p, g, (_, _, notes) in zip(paths, groups, plans, strict=True)
            ],
            "note": "experts[block][i] is the source expert id of the group's expert i",
        }
        (new_dir / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        _atomic.remove(new_dir)
        raise
    _atomic.replace_into(new_dir, out, overwrite)  # the one commit: every part and the manifest at once
    return SplitResult(tuple(paths), groups, out / MANIFEST, written)
