"""A zoo of tiny random-weight MoE models with the routing configurations of real ones, in both engines.

Each `ZooSpec` is the ``config.json`` of a real MoE checkpoint scaled down (hidden size 256, 4 decoder
layers unless its comment says otherwise) but keeping what decides the routing: expert count, top-k,
shared experts, leading dense layers, MLA, sigmoid / grouped routing, score-correction bias, MTP blocks.
`build_hf` makes a seeded transformers model from it (every bias non-zero, the fixture's tokenizer,
the MTP tensors transformers does not build), `convert` runs llama.cpp's own ``convert_hf_to_gguf.py``
(from the llama-cpp-python sdist matching the installed version, fetched once with pip) and `quantize`
runs llama.cpp's quantizer through llama-cpp-python. `zoo_model` caches both files (`cache_dir`).
Nothing here downloads a model; this is a test helper, not a test module.

    >>> hf_folder, gguf_path = zoo_model("dsv3", "f32")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "src" / "moescope" / "data" / "tiny-moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CACHE_ENV = "MOESCOPE_ZOO_CACHE"
BUILD_VERSION = 6  # bump when build_hf / convert change what they write
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # --outtype of convert_hf_to_gguf.py; others: llama.cpp ftypes
_N_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclasses.dataclass(frozen=True)
class ZooSpec:
    """One zoo model.

    name : key in `ZOO`; config : the ``config.json`` (with ``model_type``) of the real checkpoint its
    comment names, scaled down; mtp : MTP / NextN blocks the checkpoint carries (transformers builds none);
    min_agree : lower bound of the share of token-layers where both engines choose the same expert set
    (1.0: they compute the same routing); notes : why it is lower; hub_keys : ``config.json`` entries of
    the real checkpoint that transformers does not write; convert_args : extra converter flags.
    """

    name: str
    config: dict[str, Any]
    mtp: int = 0
    min_agree: float = 1.0
    notes: str = ""
    hub_keys: dict[str, Any] = dataclasses.field(default_factory=dict)
    convert_args: tuple[str, ...] = ()

    @property
    def n_experts(self) -> int:
        return next(self.config[k] for k in _N_EXPERTS_KEYS if k in self.config)

    @property
    def top_k(self) -> int:
        return self.config["num_experts_per_tok"]

    @property
    def score_bias(self) -> bool:
        """Whether the router adds an ``e_score_correction_bias`` to choose (not to weigh) experts."""
        return self.config["model_type"] in ("deepseek_v3", "glm4_moe")

    @property
    def moe_layers(self) -> list[int]:
        """Decoder layers with a router (the leading dense ones and the MTP blocks excluded)."""
        c = self.config
        dense = c.get("first_k_dense_replace", 0)
        return [i for i in range(c["num_hidden_layers"]) if i >= dense and i not in c.get("mlp_only_layers", [])]


def _cfg(model_type: str, **kw: Any) -> dict[str, Any]:
    """A zoo config: the shared small sizes (the fixture tokenizer's vocabulary), then the model's own keys."""
    base = {"vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 4, "tie_word_embeddings": False}
    return {"model_type": model_type, **base, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **kw}


# fmt: off
_YARN_DS = {"type": "yarn", "rope_type": "yarn", "beta_fast": 32, "beta_slow": 1,
            "original_max_position_embeddings": 4096}
_QWEN3NEXT = _cfg(
    "qwen3_next", num_experts=512, num_experts_per_tok=10, norm_topk_prob=True, moe_intermediate_size=16,
    shared_expert_intermediate_size=16, intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[],
    layer_types=["linear_attention"] * 3 + ["full_attention"], full_attention_interval=4, num_attention_heads=4,
    num_key_value_heads=1, head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=32, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_value_head_dim=32, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
)
_SPECS = [
    # Qwen/Qwen3-30B-A3B: 128 experts, top-8, renormalised softmax, GQA 32:4 heads, qk-norm
    ZooSpec("qwen3moe", _cfg(
        "qwen3_moe", num_local_experts=128, num_experts_per_tok=8, norm_topk_prob=True, moe_intermediate_size=32,
        intermediate_size=64, num_attention_heads=8, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, decoder_sparse_step=1, mlp_only_layers=[])),
    # openai/gpt-oss-20b: 32 experts, top-4, router + expert biases, clamped swiglu, attention sinks,
    # alternating sliding (window scaled 128 -> 32, so it matters at 64 tokens) / full attention, YaRN x32
    ZooSpec("gptoss", _cfg(
        "gpt_oss", num_local_experts=32, num_experts_per_tok=4, intermediate_size=64, num_attention_heads=8,
        num_key_value_heads=1, head_dim=32, sliding_window=32, swiglu_limit=7.0, rms_norm_eps=1e-5,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=131072,
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": 4096, "rope_theta": 150000.0, "truncate": False}),
        min_agree=0.99,  # measured 1.000 (0.997 with biases of std 0.05); exact with truncate=True
        notes="llama.cpp's YaRN floors/ceils the correction range; gpt-oss sets truncate=false"),
    # deepseek-ai/DeepSeek-V3: 256 experts in 8 groups (top-4 groups), top-8, sigmoid + e_score_correction_bias,
    # 1 shared expert, first layer dense, MLA (q_lora 1536, kv_lora 512, nope 128, rope 64, v 128 scaled by 1/8..1/16)
    ZooSpec("dsv3", _cfg(
        "deepseek_v3", n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
        topk_method="noaux_tc", moe_intermediate_size=32, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, head_dim=16, num_nextn_predict_layers=1, max_position_embeddings=163840,
        rope_parameters=_YARN_DS | {"rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # deepseek-ai/DeepSeek-V2-Lite: all 27 layers (llama.cpp tells V2-Lite by its layer count), 64 experts, top-6
    # greedy softmax without renormalisation, 2 shared experts, first layer dense, MLA without q_lora
    ZooSpec("dsv2lite", _cfg(
        "deepseek_v2", num_hidden_layers=27, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, scoring_func="softmax", moe_intermediate_size=16, intermediate_size=64,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, head_dim=16, max_position_embeddings=163840,
        rope_parameters=_YARN_DS | {"rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707})),
    # deepseek-ai/DeepSeek-V2 (236B): 160 experts in 8 groups, top-3 groups by their max score, top-6, x16
    ZooSpec("dsv2grouped", _cfg(
        "deepseek_v2", n_routed_experts=160, num_experts_per_tok=6, n_group=8, topk_group=3, n_shared_experts=2,
        topk_method="group_limited_greedy", first_k_dense_replace=1, routed_scaling_factor=16.0,
        norm_topk_prob=False, scoring_func="softmax", moe_intermediate_size=32, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, head_dim=16, max_position_embeddings=163840,
        rope_parameters=_YARN_DS | {"rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707}),
        min_agree=0.4,  # measured 0.523 (overlap 0.837); test_deepseek_v2_group_rule_is_the_difference
        notes="llama.cpp ranks groups by the sum of their top-2 scores, transformers by the max"),
    # zai-org/GLM-4.5-Air: 128 experts, top-8, sigmoid + e_score_correction_bias, n_group 1 / topk_group 1,
    # 1 shared expert, first layer dense, partial RoPE, attention biases, and its MTP (NextN) block
    ZooSpec("glm45", _cfg(
        "glm4_moe", n_routed_experts=128, num_experts_per_tok=8, n_group=1, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=True, moe_intermediate_size=32,
        intermediate_size=128, num_attention_heads=8, num_key_value_heads=1, head_dim=32, attention_bias=True,
        use_qk_norm=False, num_nextn_predict_layers=1, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}), mtp=1),
    # Qwen/Qwen3-Next-80B-A3B: 3 Gated-DeltaNet layers then 1 full-attention layer, 512 experts, top-10,
    # a shared expert with its sigmoid gate, partial RoPE (1/4); linear heads 16 k / 32 v scaled to 2 / 4
    # (a checkpoint without mtp.* tensors needs --no-mtp: the converter asserts it found some)
    ZooSpec("qwen3next", _QWEN3NEXT, convert_args=("--no-mtp",)),
    ZooSpec("qwen3next-mtp", _QWEN3NEXT, mtp=1),
    # mistralai/Mixtral-8x7B-v0.1: 8 experts, top-2, GQA 32:8
    ZooSpec("mixtral", _cfg(
        "mixtral", num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, num_attention_heads=8,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # allenai/OLMoE-1B-7B-0924: 64 experts, top-8 softmax, no renormalisation, full-width qk-norm; measured 1.000
    ZooSpec("olmoe", _cfg(
        "olmoe", num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        min_agree=0.99, notes="near-ties possible: its qk-norm spans all heads, summed in a different order"),
    # Qwen/Qwen1.5-MoE-A2.7B: 60 experts, top-4 without renormalisation, a shared expert (4x wide) with a
    # sigmoid gate, qkv biases
    ZooSpec("qwen2moe", _cfg(
        "qwen2_moe", num_experts=60, num_experts_per_tok=4, norm_topk_prob=False, moe_intermediate_size=32,
        shared_expert_intermediate_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
        qkv_bias=True, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # ibm-granite/granite-3.0-1b-a400m-base: 32 experts, top-8 softmax over the top logits, muP multipliers
    ZooSpec("granitemoe", _cfg(
        "granitemoe", num_local_experts=32, num_experts_per_tok=8, intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=1, embedding_multiplier=12.0, logits_scaling=6.0, residual_multiplier=0.22,
        attention_multiplier=0.015625, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # microsoft/Phi-3.5-MoE-instruct: 16 experts, top-2 (sparsemixer), LayerNorm with biases, GQA 32:8
    ZooSpec("phimoe", _cfg(
        "phimoe", num_local_experts=16, num_experts_per_tok=2, intermediate_size=64, num_attention_heads=8,
        num_key_value_heads=2, attention_bias=True, lm_head_bias=True, rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
            "short_mscale": 1.243163121016122, "long_mscale": 1.243163121016122,
            "short_factor": [round(1 + 0.02 * i, 2) for i in range(16)],
            "long_factor": [round(1.3**i, 3) for i in range(16)]}),
        hub_keys={"architectures": ["PhiMoEForCausalLM"]},  # the hub's (remote-code) class name: the converter's key
        min_agree=0.75, notes="llama.cpp runs PhiMoE with RMSNorm (+bias) and softmax top-2 weights, transformers "
        "with LayerNorm and sparsemixer weights"),  # measured 0.863
]
# fmt: on
ZOO: dict[str, ZooSpec] = {s.name: s for s in _SPECS}
# Quantized rows, (zoo name, outtype) -> lower bound of the mean expert overlap with transformers' f32 routing
# (random tiny models have small router margins, so quantization noise moves many choices).
QUANTIZED: dict[tuple[str, str], float] = {
    ("qwen3moe", "q8_0"): 0.95,  # the converter's own quantizer (gguf-py); measured 0.983 (same set 0.867)
    ("qwen3moe", "Q4_K_M"): 0.75,  # llama.cpp's quantizer, as llama-quantize runs it; measured 0.836 (0.152)
    ("gptoss", "MXFP4_MOE"): 0.9,  # the format gpt-oss ships in; measured 0.960 (0.844)
}


# -- llama.cpp's converter ------------------------------------------------------------------------------
def cache_dir() -> Path:
    """The zoo's cache folder, created: ``$MOESCOPE_ZOO_CACHE``, else ``$XDG_CACHE_HOME/moescope/zoo`` (default
    ``~/.cache/moescope/zoo``), outside the checkout so fresh clones and new venvs on one machine reuse it
    (entries are keyed by spec, transformers and llama-cpp-python versions; stale ones are replaced)."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = Path(os.environ.get(CACHE_ENV) or xdg / "moescope" / "zoo")
    path.mkdir(parents=True, exist_ok=True)
    return path


def llama_source() -> Path:
    """The llama.cpp folder of the llama-cpp-python sdist matching the installed version (fetched once)."""
    import llama_cpp

    version = llama_cpp.__version__
    root = cache_dir() / f"llama-cpp-python-{version}"
    if not (root / "common" / "fit.cpp").is_file():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            # the sdist of llama-cpp-python only: --no-binary :all: would also build its build backend's
            # dependencies from source to prepare the metadata (3.7 minutes here, against 5 seconds)
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", "llama-cpp-python", "--no-deps"]
            subprocess.run([*cmd, f"llama-cpp-python=={version}", "-d", tmp], check=True)
            (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
            keep = (
                "convert_hf_to_gguf.py",
                "conversion/",
                "gguf-py/",
                "common/common.h",
                "common/fit.cpp",
                "src/llama-model.cpp",
            )
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if m.name.partition("/vendor/llama.cpp/")[2].startswith(keep)]
                tar.extractall(tmp, members=members, filter="data")
            (src,) = Path(tmp).glob("*/vendor/llama.cpp")
            if root.exists():  # an older extract, without the files kept since
                shutil.rmtree(root)
            os.replace(src, root)
    return root


# Runs in the converter's process (the converter on disk is never edited), then runs the script as __main__.
# The fixture tokenizer is a byte-level BPE whose hash the converter does not know (-> gpt-2), without a
# sentencepiece model (sentencepiece is not installed either), and without the special tokens GLM's and
# Phi-3's vocab writers look up: those classes get the plain GPT-2 BPE writer.
_BOOTSTRAP = """
import importlib, runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + '/gguf-py']
import conversion.base as base
def no_spm(self, *a, **k):
    raise FileNotFoundError('no tokenizer.model: the zoo uses a BPE tokenizer.json')
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'
base.TextModel._create_vocab_sentencepiece = no_spm
for module, cls in [('conversion.glm', 'Glm4MoeModel'), ('conversion.phi', 'Phi3MiniModel')]:
    getattr(importlib.import_module(module), cls).set_vocab = base.TextModel._set_vocab_gpt2
sys.argv = [root + '/convert_hf_to_gguf.py', *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def convert(hf_folder: Path, out_gguf: Path, outtype: str = "f32", args: tuple[str, ...] = ()) -> Path:
    """Run llama.cpp's ``convert_hf_to_gguf.py`` on `hf_folder` (in a subprocess), writing `out_gguf` atomically."""
    out_gguf = Path(out_gguf)
    part = out_gguf.with_name(f".{out_gguf.name}.part")
    cmd = [sys.executable, "-c", _BOOTSTRAP, str(llama_source()), str(hf_folder), "--outtype", outtype, *args]
    proc = subprocess.run([*cmd, "--outfile", str(part)], capture_output=True, text=True)
    if proc.returncode != 0:
        part.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_folder}:\n{proc.stderr[-4000:]}")
    os.replace(part, out_gguf)
    return out_gguf


_QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, 'LLAMA_FTYPE_MOSTLY_' + sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def quantize(gguf_in: Path, gguf_out: Path, ftype_name: str) -> Path:
    """Quantize with llama.cpp's own quantizer (``llama_model_quantize``, what llama-quantize runs), e.g.
    ``ftype_name="Q4_K_M"`` or ``"MXFP4_MOE"`` (a ``llama_cpp.LLAMA_FTYPE_MOSTLY_*`` suffix)."""
    gguf_out = Path(gguf_out)
    part = gguf_out.with_name(f".{gguf_out.name}.part")
    cmd = [sys.executable, "-c", _QUANTIZE, str(gguf_in), str(part), ftype_name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        part.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({ftype_name}) failed on {gguf_in}:\n{proc.stderr[-4000:]}")
    os.replace(part, gguf_out)
    return gguf_out


# -- the transformers model -----------------------------------------------------------------------------
def build_hf(spec: ZooSpec, folder: Path, seed: int = 0) -> Path:
    """Save a seeded random-weight transformers model of `spec` in `folder` (created), with the fixture's
    tokenizer, every bias drawn non-zero, norm weights perturbed, and the MTP blocks of `spec.mtp` in
    ``model-mtp.safetensors``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kw = dict(spec.config)
    config = transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.rpartition(".")[2].endswith("bias") or name.endswith(".sinks"):
                t.copy_(_random(t.shape, name, gen))
            elif "norm" in name and name.endswith(".weight"):  # 1 (or 0 where the norm scales by 1 + w)
                t.add_(torch.randn(t.shape, generator=gen) * 0.1)
    folder = Path(folder)
    model.save_pretrained(folder)
    if spec.hub_keys:
        config_file = folder / "config.json"
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | spec.hub_keys, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy2(TOKENIZER_DIR / name, folder / name)
    if spec.mtp:
        _add_mtp(spec, folder, gen)
    return folder


# Where real checkpoints keep their MTP blocks: the block's prefix and the extra tensors' prefix (``{n}``: its
# layer index num_hidden_layers + i, ``{i}``: the MTP index), the extra tensors' shapes in hidden sizes. The
# block itself is shaped like the last decoder layer (a full-attention MoE block in every zoo model).
# fmt: off
_MTP_FORMATS = {
    # zai-org/GLM-4.5(-Air): model.layers.46.{decoder block, eh_proj, enorm, hnorm, shared_head.norm}
    "glm4_moe": ("model.layers.{n}.", "model.layers.{n}.", {
        "eh_proj.weight": (1, 2), "enorm.weight": (1,), "hnorm.weight": (1,), "shared_head.norm.weight": (1,)}),
    # Qwen/Qwen3-Next-80B-A3B: mtp.layers.0.{decoder block}, mtp.{fc, pre_fc_norm_embedding, pre_fc_norm_hidden, norm}
    "qwen3_next": ("mtp.layers.{i}.", "mtp.", {
        "fc.weight": (1, 2), "pre_fc_norm_embedding.weight": (1,), "pre_fc_norm_hidden.weight": (1,),
        "norm.weight": (1,)}),
}
# fmt: on


def _add_mtp(spec: ZooSpec, folder: Path, gen: Any) -> None:
    """Write `spec.mtp` MTP blocks, named as the real checkpoint names them, to ``model-mtp.safetensors``
    (transformers does not build them; the converter reads every ``model*.safetensors``)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    n, h = spec.config["num_hidden_layers"], spec.config["hidden_size"]
    block_at, extra_at, extra = _MTP_FORMATS[spec.config["model_type"]]
    last_at = f"model.layers.{n - 1}."
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = [k for k in f.keys() if k.startswith(last_at)]  # noqa: SIM118 (a safe_open is not iterable)
        last = {k.removeprefix(last_at): f.get_slice(k).get_shape() for k in names}
    tensors = {}
    for i in range(spec.mtp):
        block, extra_block = block_at.format(i=i, n=n + i), extra_at.format(i=i, n=n + i)
        tensors |= {block + k: _random(shape, k, gen) for k, shape in last.items()}
        tensors |= {extra_block + k: _random([m * h for m in dims], k, gen) for k, dims in extra.items()}
    save_file(tensors, folder / "model-mtp.safetensors", {"format": "pt"})


def _random(shape: Any, name: str, gen: Any) -> Any:
    """A seeded tensor for the weight `name`: norms near 1, matrices and biases std 0.02, except the
    score-correction bias: std 0.05, enough to change nearly every choice (sigmoid scores spread ~0.07)."""
    import torch

    x = torch.randn(list(shape), generator=gen)
    if "norm" in name and name.endswith("weight"):
        return 1 + 0.1 * x
    return x * (0.05 if "e_score_correction" in name else 0.02)


# -- the cache ------------------------------------------------------------------------------------------
def _key(spec: ZooSpec) -> str:
    """What a cached model depends on: the spec's build inputs, the build code's version, transformers, llama_cpp."""
    import llama_cpp
    import transformers

    inputs = [spec.config, spec.mtp, spec.hub_keys, spec.convert_args]
    what = [inputs, BUILD_VERSION, transformers.__version__, llama_cpp.__version__]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def zoo_model(name: str, outtype: str = "f32") -> tuple[Path, Path]:
    """(HF folder, GGUF) of zoo model `name`, built and converted once per cache.

    `outtype` is a converter ``--outtype`` (`CONVERTER_TYPES`) or a llama.cpp ftype (``"Q4_K_M"``,
    ``"MXFP4_MOE"``: quantized from the f32 GGUF by `quantize`).
    """
    spec = ZOO[name]
    root = cache_dir() / "models" / f"{name}-{_key(spec)}"
    hf = root / "hf"
    if not (hf / "config.json").is_file():
        for stale in root.parent.glob(f"{name}-{'?' * 16}"):  # built from an older spec or version
            shutil.rmtree(stale)
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            build_hf(spec, Path(tmp) / "hf")
            os.replace(Path(tmp) / "hf", hf)
    gguf = root / f"{name}-{outtype}.gguf"
    if not gguf.is_file():
        if outtype in CONVERTER_TYPES:
            convert(hf, gguf, outtype, spec.convert_args)
        else:
            quantize(zoo_model(name, "f32")[1], gguf, outtype)
    return hf, gguf
