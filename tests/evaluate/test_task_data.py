"""Task files: published formats and Hugging Face datasets files give the same documents; missing files are named."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_fixture_data import TASK_DOCS

from llamita.data.sources import SourceError
from llamita.evaluate.task_data import load_split
from llamita.evaluate.tasks import SUITE, TASKS


def _split_names(task: str) -> list[str]:
    if task == "mmlu":
        return ["test", "dev"]
    return [TASKS[task].eval_split, TASKS[task].fewshot_split]


@pytest.mark.parametrize("task", SUITE)
def test_published_files_read_as_hugging_face_documents(task, eval_data):
    for split in _split_names(task):
        expected = TASK_DOCS[task][split]
        if task == "mmlu":  # one csv per subject, read in subject order
            expected = sorted(expected, key=lambda d: d["subject"])
        assert load_split(task, eval_data["native"][task], split) == expected


def _write_arrow_stream(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("task", ["hellaswag", "arc_easy", "winogrande", "boolq", "piqa", "openbookqa"])
def test_hugging_face_files_read_as_the_same_documents(task, tmp_path):
    """Hub parquet shards (two, in one config folder beside another config) and save_to_disk arrow folders."""
    hub = tmp_path / "hub"
    for split, rows in TASK_DOCS[task].items():
        half = len(rows) // 2
        _write_parquet(hub / "ARC-Easy" / f"{split}-00000-of-00002.parquet", rows[:half])
        _write_parquet(hub / "ARC-Easy" / f"{split}-00001-of-00002.parquet", rows[half:])
        _write_arrow_stream(tmp_path / "saved" / split / "data-00000-of-00001.arrow", rows)
    _write_parquet(hub / "ARC-Challenge" / "train-00000-of-00001.parquet", TASK_DOCS[task]["train"][:1])
    for split, rows in TASK_DOCS[task].items():
        if task == "arc_easy":  # two configurations match; ARC-Easy's folder is preferred
            assert load_split(task, hub, split) == rows
        assert load_split(task, hub / "ARC-Easy", split) == rows
        assert load_split(task, tmp_path / "saved", split) == rows


def test_mmlu_hub_layout_groups_by_subject(tmp_path):
    for split in ("test", "dev"):
        rows = TASK_DOCS["mmlu"][split]
        _write_parquet(tmp_path / "all" / f"{split}-00000-of-00001.parquet", rows)
        _write_parquet(tmp_path / "anatomy" / f"{split}-00000-of-00001.parquet", rows[:1])  # "all" wins
        assert load_split("mmlu", tmp_path, split) == rows


def test_missing_files_name_what_is_expected_and_where_it_is_published(tmp_path):
    (tmp_path / "hellaswag").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_split("hellaswag", tmp_path / "hellaswag", "validation")
    message = str(err.value)
    assert "hellaswag_val.jsonl" in message and "https://github.com/rowanz/hellaswag" in message
    assert "Rowan/hellaswag" in message and "validation-*.parquet" in message
    with pytest.raises(FileNotFoundError, match="ARC-V1-Feb2018.zip"):
        load_split("arc_challenge", tmp_path / "nowhere", "test")


def test_piqa_without_its_labels_file_says_so(eval_data, tmp_path):
    (tmp_path / "valid.jsonl").write_text((eval_data["native"]["piqa"] / "valid.jsonl").read_text())
    with pytest.raises(FileNotFoundError, match="valid-labels.lst"):
        load_split("piqa", tmp_path, "validation")


def test_ambiguous_folders_and_wrong_files_are_reported(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "validation.jsonl").write_text(
            '{"sentence": "x _ y", "option1": "a", "option2": "b", "answer": "1"}\n'
        )
    with pytest.raises(SourceError, match="several folders"):
        load_split("winogrande", tmp_path, "validation")
    with pytest.raises(SourceError, match="missing field"):
        load_split("boolq", tmp_path / "a", "validation")
