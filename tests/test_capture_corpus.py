"""Corpus reading: files, folders, JSONL; labels from folders / stems / fields; every bad input named."""

from __future__ import annotations

import json

import pytest

from moescope.corpus import Document, read_corpus
from moescope.errors import FormatError, UsageError


def _write(path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


def test_single_text_file_is_one_document_labelled_by_stem(tmp_path):
    _write(tmp_path / "contracts.txt", "\ufeffThe party of the first part.\n")
    docs = read_corpus(tmp_path / "contracts.txt")
    assert docs == [Document("The party of the first part.\n", "contracts", str(tmp_path / "contracts.txt"))]


def test_folder_labels_sorted_recursive_hidden_and_other_suffixes_skipped(tmp_path):
    _write(tmp_path / "law" / "b.txt", "law b")
    _write(tmp_path / "law" / "a.md", "law a")
    _write(tmp_path / "law" / "eu" / "c.txt", "law eu c")
    _write(tmp_path / "code" / "x.txt", "def f(): pass")
    _write(tmp_path / "chat.txt", "hello there")
    _write(tmp_path / "notes.json", '{"text": "ignored"}')
    _write(tmp_path / ".hidden" / "h.txt", "ignored")
    _write(tmp_path / "law" / ".swp.txt", "ignored")
    _write(tmp_path / "code" / "empty.txt", "  \n\t")
    docs = read_corpus(tmp_path)
    assert [(d.label, d.text) for d in docs] == [
        ("chat", "hello there"),
        ("code", "def f(): pass"),
        ("law", "law a"),
        ("law", "law b"),
        ("law/eu", "law eu c"),
    ]


def test_jsonl_labels_from_field_else_file_label(tmp_path):
    lines = [{"text": "one", "label": "math"}, {"text": "two"}, {"text": "  "}, {"text": "three", "label": 7}]
    _write(tmp_path / "qa" / "data.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    docs = read_corpus(tmp_path)
    assert [(d.text, d.label) for d in docs] == [("one", "math"), ("two", "qa"), ("three", "7")]
    assert docs[0].source.endswith("data.jsonl:1") and docs[2].source.endswith("data.jsonl:4")
    assert [d.label for d in read_corpus(tmp_path / "qa" / "data.jsonl")] == ["math", "data", "7"]


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{not json}\n', FormatError, r"bad\.jsonl:2 is not valid JSON"),
        ("bad.jsonl", '{"text": "ok"}\n{"body": "x"}\n', FormatError, r'bad\.jsonl:2 has no string "text"'),
        ("bad.jsonl", '["text"]\n', FormatError, r"bad\.jsonl:1 has no string \"text\" field \(got list\)"),
        ("bad.jsonl", '{"text": "x", "label": [1]}\n', FormatError, r"bad\.jsonl:1 has label \[1\]"),
        ("latin.txt", "caf\xe9".encode("latin-1"), FormatError, r"latin\.txt.*not UTF-8.*byte 3 is 0xe9"),
        ("blank.txt", " \n ", FormatError, "has no text"),
    ],
)
def test_bad_inputs_name_the_file(tmp_path, name, content, error, match):
    _write(tmp_path / "c" / name, content)
    with pytest.raises(error, match=match):
        read_corpus(tmp_path / "c")


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty" / "readme.rst", "not a corpus suffix")
    with pytest.raises(FormatError, match=r"holds no \*\.txt"):
        read_corpus(tmp_path / "empty")


def test_cut_sequences_prefill_decode_and_cap():
    from moescope.corpus import Seq, cut_sequences

    docs = [(list(range(10)), "a"), (list(range(5)), "b"), ([], "c")]
    got = cut_sequences(iter(docs), mode="prefill", seq_len=4, prompt_len=None, max_tokens=None)
    assert [len(s.ids) for s in got] == [4, 4, 2, 4, 1] and [s.label for s in got] == ["a"] * 3 + ["b"] * 2
    capped = cut_sequences(iter(docs), mode="prefill", seq_len=4, prompt_len=None, max_tokens=9)
    assert sum(len(s.ids) for s in capped) == 9 and capped[-1] == Seq([8], "a")  # cut mid-document, b never read
    prompts = cut_sequences(iter(docs), mode="decode", seq_len=4, prompt_len=3, max_tokens=None)
    assert prompts == [Seq([0, 1, 2], "a"), Seq([0, 1, 2], "b")]
    with pytest.raises(FormatError, match="tokenises to no tokens"):
        cut_sequences(iter([([], "x")]), mode="prefill", seq_len=4, prompt_len=None, max_tokens=None)
