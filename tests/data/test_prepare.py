import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llamita.config import ConfigError
from llamita.data import prepare
from llamita.data.prepare import load_manifest, prepare_source, shard_paths
from llamita.data.shards import read_shard
from llamita.data.sources import SourceError
from llamita.tokenizer import train_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while small llamas eat green grass near the river".split()


def _doc(i: int) -> str:
    return f"doc {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 11)) + " é✓"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny byte-level BPE with Llama's special tokens (<unk>=0, <s>=1, </s>=2) and no padding token."""
    out = tmp_path_factory.mktemp("tokenizer")
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_doc(i) for i in range(200)], trainer)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "tokenizer_config.json").write_text(json.dumps(special))
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    return out


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, list[str], int]:
    """Four files in four formats; returns (directory, accepted documents in input order, rejected count).

    Input order is sorted path order: a.jsonl, c.parquet, d.txt, sub/b.jsonl.zst.
    """
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs_a = [_doc(i) for i in range(40)]
    lines = [json.dumps({"text": d}).encode() for d in docs_a]
    lines[5:5] = [b'{"text": "unterminated', b'{"title": "no text"}', b'{"text": 7}', b'{"text": "\xff"}']
    lines.append(b'{"text": ""}')
    (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    docs_b = [_doc(i) for i in range(40, 65)]
    blob = "".join(json.dumps({"text": d}) + "\n" for d in docs_b).encode()
    (root / "sub" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    docs_c = [_doc(i) for i in range(65, 85)]
    pq.write_table(pa.table({"text": docs_c}), root / "c.parquet", row_group_size=6)
    (root / "d.txt").write_text(_doc(85))
    return root, docs_a + docs_c + [_doc(85)] + docs_b, 5


def _run(corpus_dir: Path, tokenizer_dir: Path, out: Path, **kwargs) -> dict:
    settings = {"shard_tokens": 97, "val_fraction": 0.2, "progress": False} | kwargs
    return prepare_source("toy", [str(corpus_dir)], tokenizer_dir, out, **settings)


def _stream(out: Path, split: str) -> np.ndarray:
    arrays = [np.asarray(read_shard(p)) for p in shard_paths(out, split)]
    return np.concatenate(arrays) if arrays else np.array([], dtype=np.uint16)


def _split_docs(stream: np.ndarray, tokenizer_dir: Path) -> list[str]:
    """Cut a split's stream at EOS, check each piece is [bos] + content + [eos], decode the contents."""
    hf = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    bos, eos = hf.token_to_id("<s>"), hf.token_to_id("</s>")
    assert len(stream) and stream[-1] == eos
    cuts = np.flatnonzero(stream == eos) + 1
    docs = []
    for piece in np.split(stream, cuts[:-1]):
        assert piece[0] == bos and piece[-1] == eos
        content = piece[1:-1].tolist()
        assert content and not {0, bos, eos} & set(content), "special or padding token inside a document"
        docs.append(hf.decode(content))
    return docs


def _is_subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def test_prepare_writes_documents_shards_and_manifest(corpus, tokenizer_dir, tmp_path):
    root, docs, n_rejected = corpus
    out = tmp_path / "out"
    manifest = _run(root, tokenizer_dir, out)

    train, val = (
        _split_docs(_stream(out, "train"), tokenizer_dir),
        _split_docs(_stream(out, "val"), tokenizer_dir),
    )
    assert sorted(train + val) == sorted(docs)
    assert _is_subsequence(train, docs) and _is_subsequence(val, docs), "documents must keep input order"
    assert 0 < len(val) < len(train)

    for split in ("train", "val"):
        entries = [s for s in manifest["shards"] if s["split"] == split]
        assert [s["tokens"] for s in entries[:-1]] == [97] * (len(entries) - 1)
        assert 0 < entries[-1]["tokens"] <= 97, "the last, partial shard is kept"
        assert [out / s["file"] for s in entries] == shard_paths(out, split)
        assert sum(s["tokens"] for s in entries) == manifest["totals"][f"tokens_{split}"]

    totals = manifest["totals"]
    assert totals["docs_train"] == len(train) and totals["docs_val"] == len(val)
    assert totals["docs"] == len(docs) and totals["docs_rejected"] == n_rejected
    assert totals["docs_in"] == totals["docs"] + totals["docs_rejected"]
    inputs = {i["file"]: i for i in manifest["inputs"]}
    assert list(inputs) == ["a.jsonl", "c.parquet", "d.txt", "sub/b.jsonl.zst"]
    assert {f: i["docs"] for f, i in inputs.items()} == {
        "a.jsonl": 40,
        "c.parquet": 20,
        "d.txt": 1,
        "sub/b.jsonl.zst": 25,
    }
    rejects = {"invalid_json": 1, "missing_field": 1, "not_a_string": 1, "invalid_utf8": 1, "empty": 1}
    assert inputs["a.jsonl"]["rejects"] == rejects and inputs["c.parquet"]["rejects"] == {}
    assert sum(i["tokens"] for i in manifest["inputs"]) == totals["tokens_train"] + totals["tokens_val"]
    assert manifest["tokenizer"]["vocab_size"] == 320 and manifest["dtype"] == "uint16"
    assert manifest["settings"] == {"text_field": "text", "shard_tokens": 97, "val_fraction": 0.2, "seed": 0}
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_output_is_identical_for_any_worker_count_and_chunking(corpus, tokenizer_dir, tmp_path, monkeypatch):
    root, _, _ = corpus
    whole_files = _run(root, tokenizer_dir, tmp_path / "whole", workers=1)
    # Small tasks: the .jsonl and .parquet files are split into several parts spread over the workers.
    monkeypatch.setattr(prepare, "_TASK_BYTES", 300)
    one = _run(root, tokenizer_dir, tmp_path / "one", workers=1)
    two = _run(root, tokenizer_dir, tmp_path / "two", workers=2)
    assert one == two
    assert len(one["shards"]) > 4
    assert one["shards"] == whole_files["shards"] and one["totals"] == whole_files["totals"]
    # Only where a reject was first seen may differ: a part of a file knows byte offsets, not line numbers.
    assert one["rejects"]["by_file"] == whole_files["rejects"]["by_file"]


def test_llama_tokenizer_shards_are_each_documents_encode(corpus, tmp_path, monkeypatch):
    """With a tokenizer from train_tokenizer (which tokenizes through its piece cache), in many batches a file or in
    two workers, the stream is each accepted document's ``[bos] + encode(text) + [eos]`` in input order."""
    root, docs, _ = corpus
    tokenizer = train_tokenizer([root / "c.parquet", root / "sub" / "b.jsonl.zst"], 340, tmp_path / "tok")
    assert tokenizer._piece_cache is not None
    expected = [i for doc in docs for i in tokenizer.encode(doc, bos=True, eos=True)]
    two = _run(root, tmp_path / "tok", tmp_path / "two", workers=2, val_fraction=0)
    monkeypatch.setattr(prepare, "_ENCODE_CHARS", 200)
    one = _run(root, tmp_path / "tok", tmp_path / "one", workers=1, val_fraction=0)
    assert one["shards"] == two["shards"]
    assert _stream(tmp_path / "one", "train").tolist() == expected


def test_validation_split_is_deterministic_and_never_empty(corpus, tokenizer_dir, tmp_path):
    root, docs, _ = corpus
    a = _run(root, tokenizer_dir, tmp_path / "a", seed=3)
    b = _run(root, tokenizer_dir, tmp_path / "b", seed=3)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    c = _run(root, tokenizer_dir, tmp_path / "c", seed=4)
    assert _split_docs(_stream(tmp_path / "c", "val"), tokenizer_dir) != _split_docs(
        _stream(tmp_path / "a", "val"), tokenizer_dir
    )
    assert c["totals"]["docs"] == a["totals"]["docs"]

    # No document hashes into a 1e-12 fraction, so the last one moves to val; tiny shards: it straddles one.
    tiny = _run(root, tokenizer_dir, tmp_path / "tiny", val_fraction=1e-12, shard_tokens=5)
    assert tiny["totals"]["docs_val"] == 1
    assert _split_docs(_stream(tmp_path / "tiny", "val"), tokenizer_dir) == [docs[-1]]
    assert _split_docs(_stream(tmp_path / "tiny", "train"), tokenizer_dir) == docs[:-1]
    none = _run(root, tokenizer_dir, tmp_path / "none", val_fraction=0.0)
    assert none["totals"]["docs_val"] == 0 and shard_paths(tmp_path / "none", "val") == []


def test_rerun_skips_and_changes_rebuild(corpus, tokenizer_dir, tmp_path, caplog):
    root, _, _ = corpus
    out = tmp_path / "out"
    first = _run(root, tokenizer_dir, out, progress=True)
    files = sorted(out.rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in files}

    with caplog.at_level(logging.INFO, logger="llamita.data.prepare"):
        again = _run(root, tokenizer_dir, out)
    assert again == first
    assert "up to date" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*"))} == stamps

    # Shrinking an input rebuilds, and shards beyond the new count are removed.
    a = root / "a.jsonl"
    a.write_text(json.dumps({"text": "only document left in a"}) + "\n")
    rebuilt = _run(root, tokenizer_dir, out)
    assert rebuilt["totals"]["docs"] < first["totals"]["docs"]
    assert rebuilt["totals"]["docs_rejected"] == 0
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.bin"))
    assert on_disk == sorted(s["file"] for s in rebuilt["shards"]) and len(on_disk) < len(first["shards"])

    # Changing a setting rebuilds too.
    assert _run(root, tokenizer_dir, out, shard_tokens=50)["settings"]["shard_tokens"] == 50
    # A deleted shard is noticed and rebuilt.
    (out / "train" / "shard_00000.bin").unlink()
    _run(root, tokenizer_dir, out, shard_tokens=50)
    assert (out / "train" / "shard_00000.bin").is_file()


def test_not_prepared_directory_says_to_run_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json.*llamita prepare"):
        shard_paths(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        shard_paths(tmp_path, "test")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(prepare.ManifestError, match="unreadable"):
        load_manifest(tmp_path)


def test_bad_settings_are_refused(corpus, tokenizer_dir, tmp_path):
    root, _, _ = corpus
    with pytest.raises(ConfigError, match="--val-fraction"):
        _run(root, tokenizer_dir, tmp_path / "x", val_fraction=1.0)
    with pytest.raises(ConfigError, match="--shard-tokens"):
        _run(root, tokenizer_dir, tmp_path / "x", shard_tokens=0)


def test_worker_errors_reach_the_caller_and_leave_no_manifest(corpus, tokenizer_dir, tmp_path):
    root, _, _ = corpus
    broken = root / "sub" / "b.jsonl.zst"
    broken.write_bytes(broken.read_bytes()[:-20])
    with pytest.raises(SourceError, match="truncated") as err:
        _run(root, tokenizer_dir, tmp_path / "out", workers=2)
    assert str(broken) in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("inputs", "setting", "match"),
    [
        (
            "jsonl",
            {"text_field": "content"},
            r"toy: no documents to train on in 2 input file\(s\): all 70 record\(s\) were rejected \("
            r"invalid JSON: 1; missing field 'content': 68; invalid UTF-8: 1\); the first .* line \d+; .*--text-field",
        ),
        ("empty", {}, r"toy: no documents to train on in 2 input file\(s\): they hold no records"),
    ],
)
def test_inputs_without_documents_are_an_error_and_leave_no_output(
    corpus, tokenizer_dir, tmp_path, inputs, setting, match
):
    root, _, _ = corpus
    out = tmp_path / "out"
    _run(root, tokenizer_dir, out)  # a finished preparation, which the failed one must not leave looking current
    if inputs == "jsonl":
        root = root / "**" / "*.jsonl*"
    elif inputs == "empty":
        root = tmp_path / "empty"
        root.mkdir()
        (root / "a.jsonl").write_text("")
        (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\n\n"))
    with pytest.raises(SourceError, match=match):
        _run(root, tokenizer_dir, out, **setting)
    assert sorted(out.rglob("*")) == []


def test_a_manifest_without_train_shards_is_rebuilt(corpus, tokenizer_dir, tmp_path):
    root, _, _ = corpus
    out = tmp_path / "out"
    first = _run(root, tokenizer_dir, out)
    # As an older llamita wrote it for inputs that yielded nothing.
    stale = dict(first, shards=[s for s in first["shards"] if s["split"] == "val"])
    (out / "manifest.json").write_text(json.dumps(stale))
    assert _run(root, tokenizer_dir, out)["shards"] == first["shards"]


def test_skipped_files_are_reported_and_recorded(corpus, tokenizer_dir, tmp_path, capsys):
    root, _, _ = corpus
    (root / "notes.json").write_text("{}")
    (root / "sub" / "page.8.gz").write_bytes(b"")
    manifest = _run(root, tokenizer_dir, tmp_path / "out", progress=True)
    assert manifest["skipped"] == {
        "unsupported_type": {"count": 2, "examples": [str(root / "notes.json"), str(root / "sub" / "page.8.gz")]}
    }
    err = capsys.readouterr().err
    assert err.count("skipped 2 path(s)") == 1 and "notes.json" in err
    assert err.count("5 record(s) rejected") == 1
