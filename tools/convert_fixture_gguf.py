"""Convert the tiny fixture model (``src/moescope/data/tiny-moe``) to a float32 GGUF for the llama.cpp capture.

Runs llama.cpp's own ``convert_hf_to_gguf.py`` (vendored in the llama-cpp-python sdist, so nothing is
fetched from GitHub) on a temporary copy of the model folder, checks the result with the ``gguf`` package,
and writes it atomically (temp file beside the target, then rename). The committed model folder is never
modified. Two adaptations, both on the copy or in the converter process only:

- ``config.json`` of the copy gets ``num_experts`` and ``rope_theta`` when missing (transformers 5 saves
  ``num_local_experts`` and ``rope_parameters``; older converters read only the former keys);
- the fixture's tokenizer is a byte-level BPE trained by ``tools/train_fixture.py`` with the GPT-2
  pre-tokenizer (``ByteLevel(use_regex=True)``); its vocabulary hash is not in the converter's table of
  known tokenizers, so the pre-tokenizer name is given as ``gpt-2`` (``--pre`` to change it).

Not done here: quantisation (f32 only by default), other models, downloads.

Reproduce (from the repository root; llama-cpp-python 0.3.36 vendors the converter used for the
committed file)::

    pip download --no-binary llama-cpp-python --no-deps llama-cpp-python -d /tmp/lcp
    mkdir -p /tmp/lcp/src && tar xzf /tmp/lcp/llama_cpp_python-*.tar.gz -C /tmp/lcp/src
    .venv/bin/python tools/convert_fixture_gguf.py --llama-cpp /tmp/lcp/src --overwrite

``--llama-cpp`` is a llama.cpp checkout or any folder holding one (an extracted sdist: the script looks
for ``convert_hf_to_gguf.py`` beneath it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from moescope import _atomic
from moescope.fixture import MODEL_DIR

DEFAULT_OUT = MODEL_DIR / "tiny-moe-f32.gguf"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Runs in the converter's process: force the pre-tokenizer name, then run the script as __main__.
_BOOTSTRAP = """
import runpy, sys
root, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [root, root + '/gguf-py']
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [root + '/convert_hf_to_gguf.py', *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def find_converter(path: Path) -> Path:
    """The llama.cpp folder holding ``convert_hf_to_gguf.py`` at or beneath `path`."""
    if (path / "convert_hf_to_gguf.py").is_file():
        return path
    hits = sorted(path.glob("**/convert_hf_to_gguf.py")) if path.is_dir() else []
    if not hits:
        sys.exit(
            f"error: no convert_hf_to_gguf.py at or under {str(path)!r}; extract the llama-cpp-python sdist "
            f"(pip download --no-binary llama-cpp-python --no-deps llama-cpp-python) and pass its folder"
        )
    return hits[0].parent


def patched_config(src: Path, dst: Path) -> None:
    """Copy the model files to `dst`, adding the config keys older converters expect."""
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if "num_experts" not in config and "num_local_experts" in config:
        config["num_experts"] = config["num_local_experts"]
    if "rope_theta" not in config and "rope_theta" in (config.get("rope_parameters") or {}):
        config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    (dst / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def check_gguf(path: Path, n_layers: int) -> dict:
    """Read `path` back with the ``gguf`` package and check it is the fixture's qwen3moe model."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(key: str):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    summary = {
        "architecture": arch,
        "expert_count": field(f"{arch}.expert_count"),
        "expert_used_count": field(f"{arch}.expert_used_count"),
        "block_count": field(f"{arch}.block_count"),
        "tensors": len(reader.tensors),
        "bytes": path.stat().st_size,
    }
    names = {t.name for t in reader.tensors}
    want = {
        f"blk.{i}.{t}.weight" for i in range(n_layers) for t in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    } | {f"blk.{i}.ffn_gate_inp.weight" for i in range(n_layers)}
    problems = [f"{k}={summary[k]}" for k, v in (("architecture", "qwen3moe"), ("expert_count", 16)) if summary[k] != v]
    if summary["expert_used_count"] != 2:
        problems.append(f"expert_used_count={summary['expert_used_count']}")
    if want - names:
        problems.append(f"missing tensors {sorted(want - names)[:4]}")
    if problems:
        sys.exit(f"error: the converted GGUF is not the expected fixture: {', '.join(problems)}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp folder or an extracted sdist")
    ap.add_argument("--model", type=Path, default=MODEL_DIR, help="HF model folder (default: the fixture)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="GGUF to write (default: the fixture's)")
    ap.add_argument("--outtype", default="f32", help="converter --outtype (default f32)")
    ap.add_argument("--pre", default="gpt-2", help="llama.cpp pre-tokenizer name (default gpt-2)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args()

    root = find_converter(args.llama_cpp)
    n_layers = json.loads((args.model / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
    with tempfile.TemporaryDirectory(prefix="moescope-gguf-") as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        patched_config(args.model, model)
        with _atomic.atomic_path(args.out, overwrite=args.overwrite, suffix=".gguf") as part:
            cmd = [sys.executable, "-c", _BOOTSTRAP, str(root), args.pre, str(model)]
            cmd += ["--outtype", args.outtype, "--outfile", str(part)]
            subprocess.run(cmd, check=True)
            summary = check_gguf(part, n_layers)
    print(json.dumps({"path": str(args.out), **summary}, indent=2, default=str))


if __name__ == "__main__":
    main()
