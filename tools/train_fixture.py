"""Train moescope's fixture: a tiny real Qwen3-MoE causal LM, on offline text found on a fresh machine.

The model is transformers' own `Qwen3MoeForCausalLM` (so llama.cpp's converter handles it): hidden 64,
4 decoder layers, all MoE, 16 experts, top-2, router aux loss on, a byte-level BPE tokenizer (vocab 4096)
trained with `tokenizers`. Its routing is real routing of a trained router on real text, small enough
to commit and to run in CI on two CPU cores.

Corpus, five domains (each document's label), all read from files a fresh Debian + Python machine has:
  code     Python standard-library sources (*.py, not its tests)
  prose    licence texts (/usr/share/common-licenses) and package READMEs (/usr/share/doc)
  man      English man pages (troff markup stripped)
  i18n     translated man pages and gettext catalogues (.mo msgstr strings) in other languages
  numbers  numeric test data from the standard library's tests (decimal, math, cmath, float formats)
Files are listed in sorted order and sampled with a fixed seed under a per-domain byte cap; a few
documents per domain are held out (never trained on) and written as the fixture's held-out text.

Reproducible: the same machine image and seed give the same corpus manifest (written with hashes),
tokenizer and, with torch's deterministic CPU kernels and one thread count, the same weights.
CI does not retrain; run it by hand (about 5 minutes on 2 cores):

    .venv/bin/python tools/train_fixture.py --out src/moescope/data/tiny-moe
"""

from __future__ import annotations

import argparse
import gettext
import gzip
import hashlib
import json
import math
import random
import re
import sysconfig
import time
from pathlib import Path

DOMAINS = ("code", "prose", "man", "i18n", "numbers")
CAP_BYTES = {"code": 1_500_000, "prose": 1_000_000, "man": 1_000_000, "i18n": 1_000_000, "numbers": 600_000}
PIECE_BYTES = 8_000  # long files are cut into documents of at most this many bytes
HELDOUT_DOCS = 3  # per domain
HELDOUT_BYTES = 3_000  # per held-out document
MAN_LANGS = ("de", "fr", "es", "it", "pl", "pt_BR", "ru", "sv", "nl", "fi")

CONFIG = dict(
    vocab_size=4096,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=16,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    output_router_logits=True,
    router_aux_loss_coef=0.01,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


# ---------------------------------------------------------------------------------------------- corpus
def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


_TROFF_FONT = re.compile(r"\\f[BIRP]|\\f\(..|\\\(..|\\[-&e|^0 ]")


def _strip_troff(text: str) -> str:
    out = []
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            parts = line.split(None, 1)
            line = parts[1] if len(parts) > 1 else ""
        line = _TROFF_FONT.sub("", line).replace("\\", "")
        if line.strip():
            out.append(line)
    return "\n".join(out)


def _mo_strings(path: Path) -> str:
    with path.open("rb") as fp:
        catalog = gettext.GNUTranslations(fp)._catalog  # the only way to list every msgstr
    return "\n".join(v for k, v in sorted(catalog.items(), key=lambda kv: str(kv[0])) if k and isinstance(v, str))


def _sources() -> dict[str, list[tuple[Path, callable]]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [
        p for p in sorted(stdlib.rglob("*.py")) if not ({"test", "tests", "site-packages", "idlelib"} & set(p.parts))
    ]
    doc = Path("/usr/share/doc")
    prose = sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(doc.glob("*/README*"))
    man = sorted(Path("/usr/share/man/man1").glob("*.1.gz"))
    i18n = [p for lang in MAN_LANGS for p in sorted(Path(f"/usr/share/man/{lang}/man1").glob("*.1.gz"))]
    i18n += sorted(Path("/usr/share/locale").rglob("*.mo"))
    tests = stdlib / "test"
    numbers = sorted((tests / "decimaltestdata").glob("*.decTest")) + [
        tests / name
        for name in (
            "math_testcases.txt",
            "cmath_testcases.txt",
            "ieee754.txt",
            "formatfloat_testcases.txt",
            "floating_points.txt",
        )
    ]
    plain = _read
    man_reader = lambda p: _strip_troff(_read(p))  # noqa: E731
    return {
        "code": [(p, plain) for p in code],
        "prose": [(p, plain) for p in prose if p.is_file()],
        "man": [(p, man_reader) for p in man],
        "i18n": [(p, _mo_strings if p.suffix == ".mo" else man_reader) for p in i18n],
        "numbers": [(p, plain) for p in numbers if p.is_file()],
    }


def collect_corpus(seed: int) -> tuple[dict[str, list[dict]], list[dict]]:
    """Documents per domain (``{"text", "source"}``) under the byte caps, and a manifest of files used."""
    rng = random.Random(seed)
    corpus: dict[str, list[dict]] = {}
    manifest = []
    for domain, files in _sources().items():
        files = list(files)
        rng.shuffle(files)
        docs, used = [], 0
        for path, reader in files:
            if used >= CAP_BYTES[domain]:
                break
            text = reader(path).strip()
            if len(text) < 200:
                continue
            text = text[: CAP_BYTES[domain] - used]
            for i in range(0, len(text), PIECE_BYTES):
                docs.append({"text": text[i : i + PIECE_BYTES], "source": f"{path}#{i // PIECE_BYTES}"})
            used += len(text)
            manifest.append(
                {
                    "domain": domain,
                    "path": str(path),
                    "chars": len(text),
                    "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
                }
            )
        if not docs:
            raise SystemExit(f"no {domain} text found on this machine; the fixture needs all five domains")
        corpus[domain] = docs
    return corpus, manifest


def split_heldout(corpus: dict[str, list[dict]], seed: int) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    rng = random.Random(seed + 1)
    train, held = {}, {}
    for domain, docs in corpus.items():
        idx = set(rng.sample(range(len(docs)), HELDOUT_DOCS))
        held[domain] = [{**d, "text": d["text"][:HELDOUT_BYTES]} for i, d in enumerate(docs) if i in idx]
        train[domain] = [d for i, d in enumerate(docs) if i not in idx]
    return train, held


# ---------------------------------------------------------------------------------------------- model
def train_tokenizer(train: dict[str, list[dict]], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((d["text"] for docs in train.values() for d in docs), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def encode_stream(tokenizer, docs: list[dict]):
    import torch

    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d["text"])["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def evaluate(model, stream, seq: int) -> float:
    import torch

    model.eval()
    n = (stream.numel() - 1) // seq
    x = stream[: n * seq].view(n, seq)
    y = stream[1 : n * seq + 1].view(n, seq)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, 16):
            logits = model(input_ids=x[i : i + 16]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y[i : i + 16].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += y[i : i + 16].numel()
    model.train()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the model, tokenizer and held-out text")
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    corpus, manifest = collect_corpus(args.seed)
    train, held = split_heldout(corpus, args.seed)
    tokenizer = train_tokenizer(train, CONFIG["vocab_size"])
    stream = encode_stream(tokenizer, [d for docs in train.values() for d in docs])
    held_stream = encode_stream(tokenizer, [d for docs in held.values() for d in docs])
    print(
        f"corpus: {sum(len(v) for v in train.values())} train docs, {stream.numel():,} tokens; "
        f"held-out {held_stream.numel():,} tokens ({time.time() - t0:.0f} s)"
    )

    config = Qwen3MoeConfig(
        **CONFIG,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = Qwen3MoeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))),
    )
    gen = torch.Generator().manual_seed(args.seed)
    log = []
    t1 = time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, stream.numel() - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([stream[s : s + args.seq] for s in starts.tolist()])
        y = torch.stack([stream[s + 1 : s + args.seq + 1] for s in starts.tolist()])
        out = model(input_ids=x, output_router_logits=True)  # x and y are already shifted: own loss
        logits = out.logits
        lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = lm + config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            entry = {
                "step": step,
                "lm_loss": round(lm.item(), 4),
                "aux_loss": round(out.aux_loss.item(), 4),
                "seconds": round(time.time() - t1, 1),
            }
            log.append(entry)
            print(entry, flush=True)
    ppl = evaluate(model, held_stream, args.seq)
    train_minutes = (time.time() - t1) / 60
    print(f"held-out perplexity {ppl:.1f}; {n_params:,} parameters; trained in {train_minutes:.1f} min")

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    held_dir = args.out / "heldout"
    for domain, docs in held.items():
        (held_dir / domain).mkdir(parents=True, exist_ok=True)
        for i, d in enumerate(docs):
            (held_dir / domain / f"{i}.txt").write_text(d["text"], encoding="utf-8")
    report = {
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "lr": args.lr,
        "threads": args.threads,
        "parameters": n_params,
        "heldout_perplexity": round(ppl, 2),
        "train_tokens": int(stream.numel()),
        "heldout_tokens": int(held_stream.numel()),
        "train_minutes": round(train_minutes, 2),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "log": log,
        "corpus": manifest,
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
