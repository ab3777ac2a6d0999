"""The corpus: the text a model is run over (captures, top-k and split evaluations), read into labelled
documents, and token ids cut into the sequences a run feeds the model.

A corpus is one of:

- a text file (any suffix but ``.jsonl``): one document, labelled with the file's stem;
- a ``.jsonl`` file: one document per line, an object with a string ``text`` field and an optional
  ``label`` (string or integer); without ``label``, the document takes the file's label as below;
- a folder: every ``*.txt``, ``*.md`` and ``*.jsonl`` file inside, recursively, in sorted path order
  (hidden files and folders, whose name starts with ``.``, are skipped). A file directly in the folder
  is labelled with its stem (``law.txt`` -> ``law``); a file in a sub-folder is labelled with that
  sub-folder's path relative to the corpus root (``law/a.txt`` -> ``law``, ``law/eu/b.md`` -> ``law/eu``).
  Grouping files by folder is the usual way to label workloads.

Text is read as UTF-8 (a byte-order mark is dropped). Documents that are empty or only whitespace are
skipped; a corpus with no document left is an error. `cut_sequences` turns tokenised documents into the
sequences to run (prefill windows or decode prompts). This module does no tokenisation and never
modifies its input.

    >>> docs = read_corpus("corpus/")      # [Document(text=..., label="law", source="corpus/law/a.txt"), ...]
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path

from moescope.errors import FormatError, UsageError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
FOLDER_SUFFIXES = (*TEXT_SUFFIXES, JSONL_SUFFIX)


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a corpus.

    text : the document's text.
    label : workload label (see the module docstring for how it is chosen).
    source : where it came from: ``path`` for a text file, ``path:line`` for a JSONL line.
    """

    text: str
    label: str
    source: str


def read_corpus(path: str | os.PathLike) -> list[Document]:
    """Every non-empty document of a corpus file or folder, in a deterministic order.

    Parameters
    ----------
    path : a text file, a ``.jsonl`` file, or a folder (see the module docstring).

    Returns
    -------
    list of `Document`, at least one.

    Raises
    ------
    UsageError : the path does not exist.
    FormatError : no document (empty folder, empty files), undecodable bytes, a bad JSONL line.
    """
    root = Path(path)
    if not root.exists():
        raise UsageError(f"corpus {str(root)!r} does not exist; give a text file, a .jsonl file or a folder")
    if root.is_dir():
        files = corpus_files(root)
        if not files:
            raise FormatError(
                f"corpus folder {str(root)!r} holds no {', '.join('*' + s for s in FOLDER_SUFFIXES)} file; "
                f"put one document per text file (or one per line of a .jsonl file) inside it"
            )
        docs = [doc for f in files for doc in read_file(f, file_label(f, root))]
    else:
        docs = read_file(root, root.stem)
    if not docs:
        raise FormatError(
            f"corpus {str(root)!r} has no text: every document is empty or whitespace; check the files' contents"
        )
    return docs


def corpus_files(root: Path) -> list[Path]:
    """[files] the corpus files under folder `root`, recursively, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(FOLDER_SUFFIXES):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def file_label(path: Path, root: Path) -> str:
    """The label of corpus file `path` under folder `root`: its sub-folder relative to `root`, or its stem."""
    parent = path.parent.relative_to(root).as_posix()
    return path.stem if parent in ("", ".") else parent


def read_file(path: Path, label: str) -> list[Document]:
    """The non-empty documents of one corpus file (a ``.jsonl`` file holds many, a text file one)."""
    text = _read_text(path)
    if path.suffix.lower() != JSONL_SUFFIX:
        return [Document(text, label, str(path))] if text.strip() else []
    return parse_jsonl(text, str(path), label)


def parse_jsonl(text: str, source: str, default_label: str) -> list[Document]:
    """Documents from JSON Lines text: one object per non-blank line with ``text`` and optional ``label``.

    Parameters
    ----------
    text : the whole file's content.
    source : the file's name, for `Document.source` and error messages (``source:line``).
    default_label : label of a line without a ``label`` field.
    """
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FormatError(
                f"{where} is not valid JSON ({exc.msg}, column {exc.colno}); each line of a .jsonl corpus "
                f'must be one object like {{"text": "...", "label": "law"}}'
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            if not isinstance(obj, dict):
                got = type(obj).__name__
            else:
                got = f"text of type {type(obj['text']).__name__}" if "text" in obj else f"keys {sorted(obj)[:6]}"
            raise FormatError(
                f'{where} has no string "text" field (got {got}); each line must be an object like '
                f'{{"text": "...", "label": "law"}}'
            )
        label = obj.get("label", default_label)
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise FormatError(f'{where} has label {label!r}; a "label" must be a string or an integer')
        if obj["text"].strip():
            docs.append(Document(obj["text"], str(label), where))
    return docs


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"cannot read corpus file {str(path)!r} ({exc.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FormatError(
            f"corpus file {str(path)!r} is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}); "
            f"convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it from the corpus"
        ) from None


MODES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True)
class Seq:
    """One sequence to run: its token ids and the label of the document it came from."""

    ids: list[int]
    label: str | None


def cut_sequences(
    tokenised: Iterable[tuple[list[int], str | None]],
    *,
    mode: str,
    seq_len: int,
    prompt_len: int | None,
    max_tokens: int | None,
) -> list[Seq]:
    """Token-id lists (with labels) -> the sequences a capture runs, for every engine.

    Prefill: each list is cut into sequences of at most `seq_len` ids, stopping at `max_tokens` in all.
    Decode: each non-empty list gives one prompt of its first `prompt_len` (default `seq_len`) ids.
    `tokenised` is consumed lazily, so documents past `max_tokens` are never tokenised.
    """
    seqs: list[Seq] = []
    total = 0
    for ids, label in tokenised:
        if mode == "decode":
            if ids:
                seqs.append(Seq(ids[: prompt_len or seq_len], label))
            continue
        for lo in range(0, len(ids), seq_len):
            chunk = ids[lo : lo + seq_len][: None if max_tokens is None else max_tokens - total]
            if chunk:
                seqs.append(Seq(chunk, label))
                total += len(chunk)
        if max_tokens is not None and total >= max_tokens:
            break
    if not seqs:
        raise FormatError("the corpus tokenises to no tokens; check the documents and the tokenizer")
    return seqs
