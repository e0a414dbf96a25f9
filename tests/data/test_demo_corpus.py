"""Demo corpus: valid JSONL, same bytes each call, pydoc topics and docstrings as prose, parseable code."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from llamita.data.demo_corpus import demo_corpus_stats, write_demo_corpus

TOPIC_BYTES = sum(len(text.encode("utf-8")) for text in topics.values())
CODE_CAP = 100_000
PROSE_CAP = TOPIC_BYTES + 1  # every topic, then exactly one module's docstrings


def _read(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_demo_corpus(tmp_path_factory.mktemp("a"), max_code_bytes=CODE_CAP, max_prose_bytes=PROSE_CAP)


def test_files_are_jsonl_with_text(corpus):
    assert set(corpus) == {"prose", "code"}
    for path in corpus.values():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assert list(record) == ["text"] and isinstance(record["text"], str) and record["text"].strip()


def test_same_bytes_on_every_call(corpus, tmp_path):
    again = write_demo_corpus(tmp_path, max_code_bytes=CODE_CAP, max_prose_bytes=PROSE_CAP)
    for name, path in corpus.items():
        assert again[name].read_bytes() == path.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_prose_is_pydoc_topics_then_docstrings(corpus):
    prose, code = _read(corpus["prose"]), _read(corpus["code"])
    assert prose[: len(topics)] == [topics[key] for key in sorted(topics)]
    assert len(prose) == len(topics) + 1
    docstrings = prose[-1]
    assert docstrings not in topics.values()
    assert any(docstrings.splitlines()[0] in source for source in code)  # read from a stdlib file's text


def test_code_is_stdlib_python_source(corpus):
    code = _read(corpus["code"])
    assert len(code) > 1
    for source in code:
        ast.parse(source)


def test_caps_stop_at_the_first_document_reaching_them(corpus):
    stats = demo_corpus_stats(corpus)
    for name, cap in (("code", CODE_CAP), ("prose", PROSE_CAP)):
        sizes = [len(text.encode("utf-8")) for text in _read(corpus[name])]
        assert stats[name] == {"docs": len(sizes), "bytes": sum(sizes)}
        assert sum(sizes[:-1]) < cap <= sum(sizes)


def test_tiny_cap_gives_one_document(tmp_path):
    stats = demo_corpus_stats(write_demo_corpus(tmp_path, max_code_bytes=1, max_prose_bytes=1))
    assert stats["code"]["docs"] == stats["prose"]["docs"] == 1
