import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llamita.data.sources import (
    SUPPORTED_SUFFIXES,
    Rejects,
    SourceError,
    expand_inputs,
    iter_documents,
    iter_records,
    plan_spans,
)

DOCS = ["first document", "second one\nwith two lines", "tiếng Việt và 日本語", "last"]


def _jsonl_bytes(docs: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: d, "meta": {"i": i}}) + "\n" for i, d in enumerate(docs)).encode()


def write_fixture(directory: Path, suffix: str, docs: list[str] = DOCS) -> Path:
    path = directory / f"data{suffix}"
    if suffix == ".txt":
        path.write_text(docs[0], encoding="utf-8")
    elif suffix == ".txt.gz":
        path.write_bytes(gzip.compress(docs[0].encode()))
    elif suffix == ".txt.zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(docs[0].encode()))
    elif suffix == ".jsonl":
        path.write_bytes(_jsonl_bytes(docs))
    elif suffix == ".jsonl.gz":
        path.write_bytes(gzip.compress(_jsonl_bytes(docs)))
    elif suffix == ".jsonl.zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(docs)))
    elif suffix == ".parquet":
        pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), path)
    return path


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_every_format_yields_its_documents(tmp_path, suffix):
    path = write_fixture(tmp_path, suffix)
    field = "content" if suffix == ".parquet" else "text"
    rejects = Rejects()
    docs = list(iter_documents(path, text_field=field, rejects=rejects))
    assert docs == (DOCS[:1] if suffix.startswith(".txt") else DOCS)
    assert rejects.total == 0


def test_multi_frame_zst_reads_all_frames(tmp_path):
    path = tmp_path / "multi.jsonl.zst"
    cctx = zstandard.ZstdCompressor()
    path.write_bytes(cctx.compress(_jsonl_bytes(DOCS[:2])) + cctx.compress(_jsonl_bytes(DOCS[2:])))
    assert list(iter_documents(path)) == DOCS


def test_jsonl_rejects_are_counted_per_reason(tmp_path):
    lines = [
        b'{"text": "good one"}',
        b'{"text": "broken',  # invalid_json
        b'{"other": "no text"}',  # missing_field
        b'{"text": null}',  # missing_field
        b'["not", "an", "object"]',  # missing_field
        b'{"text": 42}',  # not_a_string
        b'{"text": "bad \xff\xfe bytes"}',  # invalid_utf8
        b'{"text": "lone \\ud800 surrogate"}',  # invalid_utf8
        b'{"text": "   \\n "}',  # empty
        b"",  # blank line: no record
        b'{"text": "good \\u00e9 two"}',
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rejects = Rejects()
    records = list(iter_records(path, rejects=rejects))
    docs = [text for _, text in records if text is not None]

    assert docs == ["good one", "good \u00e9 two"]
    expected = {"invalid_json": 1, "missing_field": 3, "not_a_string": 1, "invalid_utf8": 2, "empty": 1}
    assert rejects.by_file == {str(path): expected}
    assert rejects.total == 8
    assert len(records) == len(docs) + rejects.total
    summary = rejects.summary()
    assert str(path) in summary and "invalid_json=1 (first at line 2)" in summary
    assert "invalid_utf8=2 (first at line 7)" in summary


def test_txt_rejects_invalid_utf8_and_empty(tmp_path):
    bad, empty = tmp_path / "bad.txt", tmp_path / "empty.txt"
    bad.write_bytes(b"ok then \xc3\x28 broken")
    empty.write_text(" \n\t ")
    rejects = Rejects()
    assert list(iter_documents(bad, rejects=rejects)) == []
    assert list(iter_documents(empty, rejects=rejects)) == []
    assert rejects.by_file == {str(bad): {"invalid_utf8": 1}, str(empty): {"empty": 1}}


def test_parquet_rejects(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"content": [b"fine", None, b"", b"\xff\xfe", b"also fine"]}), path)
    rejects = Rejects()
    assert list(iter_documents(path, "content", rejects)) == ["fine", "also fine"]
    assert rejects.by_file == {str(path): {"missing_field": 1, "empty": 1, "invalid_utf8": 1}}
    assert "first at row 3" in rejects.summary()


def test_parquet_without_the_column_names_file_column_and_columns(tmp_path):
    path = write_fixture(tmp_path, ".parquet")
    with pytest.raises(SourceError) as err:
        list(iter_documents(path, text_field="text"))
    message = str(err.value)
    assert str(path) in message and "'text'" in message and "id, content" in message


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".txt.gz", ".txt.zst"])
def test_truncated_archive_raises_naming_the_file(tmp_path, suffix):
    docs = [" ".join(f"document number {i}" for i in range(j, j + 300)) for j in range(300)]
    path = write_fixture(tmp_path, suffix, docs)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="truncated or corrupt") as err:
        list(iter_documents(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".txt.gz", ".txt.zst"])
def test_corrupt_archive_raises_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(b"this is not compressed data at all" * 10)
    with pytest.raises(SourceError) as err:
        list(iter_documents(path))
    assert str(path) in str(err.value)


def test_jsonl_spans_cover_every_record_exactly_once(tmp_path):
    docs = [f"doc {i} " + "x" * (i % 17) for i in range(200)]
    path = write_fixture(tmp_path, ".jsonl", docs)
    whole = list(iter_records(path))
    spans = plan_spans(path, target_bytes=333)
    assert len(spans) > 5
    parts = [record for span in spans for record in iter_records(path, span=span)]
    assert parts == whole
    assert [text for _, text in whole] == docs


def test_parquet_spans_follow_row_groups(tmp_path):
    docs = [f"row {i} " * 10 for i in range(100)]
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"text": docs}), path, row_group_size=10)
    spans = plan_spans(path, target_bytes=1)
    assert spans == [(g, g + 1) for g in range(10)]
    parts = [record for span in spans for record in iter_records(path, span=span)]
    assert parts == list(iter_records(path)) == list(enumerate(docs))


def test_expand_inputs_files_dirs_globs(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    files = [tmp_path / "a" / "x.jsonl", tmp_path / "a" / "deep" / "y.jsonl.zst", tmp_path / "z.txt"]
    for f in files:
        f.write_text("x")
    (tmp_path / "a" / "notes.md").write_text("not an input")
    (tmp_path / "a" / ".hidden" / "skip.jsonl").write_text("x")

    got = expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.txt"), str(files[0]), str(tmp_path / "a")])
    assert got.files == sorted(f.resolve() for f in files)
    assert expand_inputs([str(tmp_path / "**" / "*.zst")]).files == [files[1].resolve()]


def test_expand_inputs_reports_what_it_skips(tmp_path):
    (tmp_path / "d" / ".git").mkdir(parents=True)
    (tmp_path / "d" / ".git" / "HEAD").write_text("ref")
    for name in ["a.jsonl", "b.txt.gz", "c.txt.zst", "x.json", "man.8.gz", "README", ".DS_Store"]:
        (tmp_path / "d" / name).write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "d" / "link").symlink_to(tmp_path / "elsewhere")

    found = expand_inputs([str(tmp_path / "d")])
    d = (tmp_path / "d").resolve()
    assert found.files == [d / "a.jsonl", d / "b.txt.gz", d / "c.txt.zst"]
    assert found.skipped == {
        "unsupported_type": [d / "README", d / "man.8.gz", d / "x.json"],
        "hidden": [d / ".DS_Store", d / ".git"],
        "symlinked_dir": [d / "link"],
    }
    assert found.skipped_total == 6
    summary = found.skipped_summary(examples=2)
    assert summary.startswith("skipped 6 path(s)")
    assert "unsupported type: 3 (" in summary and ".json: 1" in summary and ".8.gz: 1" in summary
    assert "no suffix: 1" in summary and f"{d / 'README'}, {d / 'man.8.gz'}, ..." in summary
    assert found.skipped_dict(examples=1)["unsupported_type"] == {"count": 3, "examples": [str(d / "README")]}

    # A glob reports the unsupported files it matches; files it reads are not reported.
    globbed = expand_inputs([str(tmp_path / "d" / "*")])
    assert globbed.files == found.files and globbed.skipped["unsupported_type"] == found.skipped["unsupported_type"]
    clean = expand_inputs([str(tmp_path / "d" / "a.jsonl")])
    assert clean.skipped == {} and clean.skipped_summary() == ""


def test_expand_inputs_errors_name_the_pattern(tmp_path):
    missing = str(tmp_path / "nothing-*.jsonl")
    with pytest.raises(SourceError, match="nothing-"):
        expand_inputs([missing])
    with pytest.raises(SourceError, match="no such file"):
        expand_inputs([str(tmp_path / "absent.jsonl")])
    unsupported = tmp_path / "data.csv"
    unsupported.write_text("a,b")
    with pytest.raises(SourceError) as err:
        expand_inputs([str(unsupported)])
    assert str(unsupported) in str(err.value) and ".jsonl.zst" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no input files"):
        expand_inputs([str(tmp_path / "empty")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "rows.json").write_text("[]")
    with pytest.raises(SourceError, match=r"no input files; skipped 1 path.*unsupported type: 1 \(\.json: 1"):
        expand_inputs([str(tmp_path / "other")])


def test_rejects_merge_keeps_first_location(tmp_path):
    a, b = Rejects(), Rejects()
    a.add("f.jsonl", "empty", "line 3")
    b.add("f.jsonl", "empty", "line 9")
    b.add("g.jsonl", "invalid_json")
    a.merge(b)
    assert a.by_file == {"f.jsonl": {"empty": 2}, "g.jsonl": {"invalid_json": 1}}
    assert a.by_reason == {"invalid_json": 1, "empty": 2}
    assert a.to_dict() == {
        "total": 3,
        "by_file": {"f.jsonl": {"empty": 2}, "g.jsonl": {"invalid_json": 1}},
        "first": {"f.jsonl": {"empty": "line 3"}},
    }
    with pytest.raises(ValueError, match="unknown reject reason"):
        a.add("f.jsonl", "too_long")
    assert Rejects().summary() == "no records rejected"
    # The JSON form (a resumed prepare's) gives back the same counts and first locations.
    again = Rejects.from_dict(json.loads(json.dumps(a.to_dict())))
    assert again.to_dict() == a.to_dict() and again.summary() == a.summary()
    with pytest.raises(ValueError, match="bad reject count"):
        Rejects.from_dict({"by_file": {"f.jsonl": {"too_long": 1}}, "first": {}})


def test_files_linked_to_suffixless_blobs_are_read_by_their_names(tmp_path):
    """A Hugging Face hub cache snapshot: `snapshots/<rev>/data.jsonl` is a symlink to `blobs/<hash>`."""
    blob = tmp_path / "blobs" / "3f2a9c"
    blob.parent.mkdir()
    blob.write_text('{"text": "one"}\n{"text": "two"}\n')
    snapshot = tmp_path / "snapshots" / "main"
    snapshot.mkdir(parents=True)
    (snapshot / "data.jsonl").symlink_to(blob)
    for pattern in [snapshot, snapshot / "data.jsonl", snapshot / "*.jsonl"]:
        found = expand_inputs([str(pattern)])
        assert found.files == [snapshot / "data.jsonl"]
        assert list(iter_documents(found.files[0])) == ["one", "two"]
