"""Real-size GGUF models as sparse files: the header of a real checkpoint's layout, the data all holes.

`sparse_qwen3_moe` writes the tensor layout of Qwen3-30B-A3B quantized like llama.cpp's Q4_K_M (48 blocks,
128 experts, top-8, hidden 2048, expert FFN 768, vocabulary 151,936; expert down projections Q6_K in
every other block, so layers differ in bytes) with a synthetic SentencePiece vocabulary of the same size.
The file has the full size (about 17 GiB) but only its header is written: the rest is a hole, so it costs a
few MB of disk. Planning reads the header only, and llama.cpp's metadata-only load (``no_alloc``, no mmap)
never reads the weights, so offload plans are computed and verified at real sizes without a download.
This is a test helper, not a test module.

    >>> path = sparse_qwen3_moe(tmp_path / "qwen3-30b-a3b-q4_k_m.gguf")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

QWEN3_30B_A3B = {
    "n_blocks": 48,
    "n_embd": 2048,
    "n_experts": 128,
    "top_k": 8,
    "n_ff_exp": 768,
    "n_ff": 6144,
    "heads": 32,
    "heads_kv": 4,
    "head_dim": 128,
    "vocab": 151936,
    "ctx_train": 40960,
}


def _nbytes(shape: tuple[int, ...], qtype: object) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    assert n % block == 0, (shape, qtype)
    return n // block * size


def sparse_qwen3_moe(path: str | os.PathLike, config: dict | None = None) -> Path:
    """Write a sparse real-size Qwen3-MoE GGUF (see the module docstring) at `path`; `config` overrides
    entries of `QWEN3_30B_A3B`."""
    import gguf

    c = {**QWEN3_30B_A3B, **(config or {})}
    Q = gguf.GGMLQuantizationType
    arch = "qwen3moe"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("Qwen3-30B-A3B-shaped (sparse, no weights)")
    w.add_context_length(c["ctx_train"])
    w.add_embedding_length(c["n_embd"])
    w.add_feed_forward_length(c["n_ff"])
    w.add_block_count(c["n_blocks"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["heads_kv"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(c["n_experts"])
    w.add_expert_used_count(c["top_k"])
    w.add_expert_feed_forward_length(c["n_ff_exp"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    # a SentencePiece vocabulary of the real size: control tokens, the 256 byte tokens, then filler pieces
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581t{i}" for i in range(c["vocab"] - len(tokens))]
    types = [3, 3, 3] + [6] * 256 + [1] * (c["vocab"] - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * c["vocab"])
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def tensor(name: str, shape: tuple[int, ...], qtype: object) -> None:
        # shape in numpy order (outermost first); gguf-py takes a quantized one as bytes per row
        if qtype == Q.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
            return
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = (*shape[:-1], shape[-1] // block * size)
        w.add_tensor_info(name, rows, np.dtype(np.uint8), _nbytes(shape, qtype), raw_dtype=qtype)

    e, h, d = c["n_embd"], c["heads"], c["head_dim"]
    tensor("token_embd.weight", (c["vocab"], e), Q.Q4_K)
    for b in range(c["n_blocks"]):
        p = f"blk.{b}."
        tensor(p + "attn_norm.weight", (e,), Q.F32)
        tensor(p + "attn_q.weight", (h * d, e), Q.Q4_K)
        tensor(p + "attn_k.weight", (c["heads_kv"] * d, e), Q.Q4_K)
        tensor(p + "attn_v.weight", (c["heads_kv"] * d, e), Q.Q6_K)
        tensor(p + "attn_output.weight", (e, h * d), Q.Q4_K)
        tensor(p + "attn_q_norm.weight", (d,), Q.F32)
        tensor(p + "attn_k_norm.weight", (d,), Q.F32)
        tensor(p + "ffn_norm.weight", (e,), Q.F32)
        tensor(p + "ffn_gate_inp.weight", (c["n_experts"], e), Q.F32)
        tensor(p + "ffn_gate_exps.weight", (c["n_experts"], c["n_ff_exp"], e), Q.Q4_K)
        tensor(p + "ffn_up_exps.weight", (c["n_experts"], c["n_ff_exp"], e), Q.Q4_K)
        down = Q.Q6_K if b % 2 == 0 else Q.Q4_K  # Q4_K_M gives some down projections more bits
        tensor(p + "ffn_down_exps.weight", (c["n_experts"], e, c["n_ff_exp"]), down)
    tensor("output_norm.weight", (e,), Q.F32)
    tensor("output.weight", (c["vocab"], e), Q.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    header = fout.tell()
    data = sum(gguf.GGUFWriter.ggml_pad(ti.nbytes, w.data_alignment) for ti in w.tensors[0].values())
    w.close()
    os.truncate(path, gguf.GGUFWriter.ggml_pad(header, w.data_alignment) + data)  # the weights: a hole
    return Path(path)
