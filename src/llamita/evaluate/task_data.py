"""Evaluation data on disk: find a task's split files and read them into documents with Hugging Face's columns.

Each task reads two kinds of files, and both give the same documents:

- the dataset's own published files (HellaSwag's ``hellaswag_val.jsonl``, ARC's ``ARC-Easy-Test.jsonl``, PIQA's
  ``valid.jsonl`` with ``valid-labels.lst``, MMLU's ``data/test/<subject>_test.csv``, ...);
- Hugging Face ``datasets`` files already on disk: hub parquet shards (``validation-00000-of-00001.parquet``),
  ``save_to_disk`` folders (``validation/data-00000-of-00001.arrow``) or cache files (``hellaswag-validation.arrow``).

Every record becomes a dict with exactly the columns and value types of the Hugging Face dataset that
lm-evaluation-harness loads (e.g. HellaSwag's ``label`` is the string ``"2"``), so prompts, few-shot sampling and
the "is this the same document" test behave as they do there. Nothing is downloaded: a missing file is an error
that names the files expected and where they are published.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from llamita.data.sources import SourceError

Doc = dict[str, Any]

_SEARCH_DEPTH = 4
"""How many directory levels below a --data directory are searched for split files."""


@dataclass(frozen=True)
class DataSpec:
    """Where a task's data is published and how its files are named.

    Attributes:
        hf_dataset: The Hugging Face dataset lm-eval loads (``dataset_path``).
        hf_config: Its configuration (``dataset_name``); a folder of that name is preferred when several match.
        native_url: Where the dataset's own files are published.
        native_files: Split -> the published file names of that split.
        to_doc: Turns one record, published or Hugging Face, into a document with the Hugging Face columns.
    """

    hf_dataset: str
    hf_config: str | None
    native_url: str
    native_files: dict[str, tuple[str, ...]]
    to_doc: Callable[[dict[str, Any], int, str], Doc] = field(repr=False)


# ------------------------------------------------------------------------------------------ records -> docs
def _require(record: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise SourceError(f"{where}: missing field(s) {', '.join(missing)}; is this the right file for the task?")


def _hellaswag_doc(record: dict[str, Any], index: int, where: str) -> Doc:
    keys = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type")
    _require(record, (*keys, "label"), where)
    # The published file's label is an int, the hub's a string ("" on the unlabelled test split).
    return {**{k: record[k] for k in keys}, "label": str(record["label"])}


def _arc_choices(record: dict[str, Any]) -> dict[str, list[str]]:
    choices = record["choices"] if "choices" in record else record["question"]["choices"]
    if isinstance(choices, dict):
        return {"text": list(choices["text"]), "label": list(choices["label"])}
    return {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}


def _arc_doc(record: dict[str, Any], index: int, where: str) -> Doc:
    _require(record, ("id", "question", "answerKey"), where)
    question = record["question"]
    if isinstance(question, dict):  # ARC-V1-Feb2018: {"question": {"stem", "choices": [{text, label}]}}
        return {
            "id": record["id"],
            "question": question["stem"],
            "choices": _arc_choices(record),
            "answerKey": record["answerKey"],
        }
    return {"id": record["id"], "question": question, "choices": _arc_choices(record), "answerKey": record["answerKey"]}


def _openbookqa_doc(record: dict[str, Any], index: int, where: str) -> Doc:
    if isinstance(record.get("question"), dict):  # OpenBookQA-V1-Sep2018: the ARC layout
        _require(record, ("id", "answerKey"), where)
        stem = record["question"]["stem"]
    else:
        _require(record, ("id", "question_stem", "choices", "answerKey"), where)
        stem = record["question_stem"]
    return {
        "id": record["id"],
        "question_stem": stem,
        "choices": _arc_choices(record),
        "answerKey": record["answerKey"],
    }


def _winogrande_doc(record: dict[str, Any], index: int, where: str) -> Doc:
    keys = ("sentence", "option1", "option2", "answer")
    _require(record, keys, where)
    return {k: str(record[k]) for k in keys}


def _boolq_doc(record: dict[str, Any], index: int, where: str) -> Doc:
    _require(record, ("question", "passage"), where)
    if "label" in record:  # super_glue / SuperGLUE's BoolQ/val.jsonl: label (bool or 0/1), idx
        label, idx = int(record["label"]), record.get("idx", index)
    elif "answer" in record:  # BoolQ's own dev.jsonl: answer true/false, no idx (super_glue numbers the rows)
        label, idx = int(record["answer"]), index
    else:
        raise SourceError(f"{where}: neither 'answer' (BoolQ) nor 'label' (SuperGLUE) is present")
    return {"question": record["question"], "passage": record["passage"], "idx": idx, "label": label}


def _piqa_doc(record: dict[str, Any], index: int, where: str) -> Doc:
    _require(record, ("goal", "sol1", "sol2", "label"), where)
    return {"goal": record["goal"], "sol1": record["sol1"], "sol2": record["sol2"], "label": int(record["label"])}


MMLU_LETTERS = ("A", "B", "C", "D")


def _mmlu_doc(record: dict[str, Any], index: int, where: str) -> Doc:
    _require(record, ("question", "subject", "choices", "answer"), where)
    answer = record["answer"]
    if isinstance(answer, str):  # the published csv's letter
        if answer.strip() not in MMLU_LETTERS:
            raise SourceError(f"{where}: answer {answer!r} is not one of A, B, C, D")
        answer = MMLU_LETTERS.index(answer.strip())
    return {
        "question": record["question"],
        "subject": record["subject"],
        "choices": list(record["choices"]),
        "answer": int(answer),
    }


_ARC_URL = "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip"

DATA_SPECS: dict[str, DataSpec] = {
    "hellaswag": DataSpec(
        "Rowan/hellaswag",
        None,
        "https://github.com/rowanz/hellaswag/tree/master/data",
        {"validation": ("hellaswag_val.jsonl",), "train": ("hellaswag_train.jsonl",)},
        _hellaswag_doc,
    ),
    "arc_easy": DataSpec(
        "allenai/ai2_arc",
        "ARC-Easy",
        _ARC_URL,
        {"test": ("ARC-Easy-Test.jsonl",), "train": ("ARC-Easy-Train.jsonl",), "validation": ("ARC-Easy-Dev.jsonl",)},
        _arc_doc,
    ),
    "arc_challenge": DataSpec(
        "allenai/ai2_arc",
        "ARC-Challenge",
        _ARC_URL,
        {
            "test": ("ARC-Challenge-Test.jsonl",),
            "train": ("ARC-Challenge-Train.jsonl",),
            "validation": ("ARC-Challenge-Dev.jsonl",),
        },
        _arc_doc,
    ),
    "openbookqa": DataSpec(
        "allenai/openbookqa",
        "main",
        "https://ai2-public-datasets.s3.amazonaws.com/open-book-qa/OpenBookQA-V1-Sep2018.zip (Data/Main/)",
        {"test": ("test.jsonl",), "train": ("train.jsonl",), "validation": ("dev.jsonl",)},
        _openbookqa_doc,
    ),
    "winogrande": DataSpec(
        "allenai/winogrande",
        "winogrande_xl",
        "https://storage.googleapis.com/ai2-mosaic/public/winogrande/winogrande_1.1.zip",
        {"validation": ("dev.jsonl",), "train": ("train_xl.jsonl",)},
        _winogrande_doc,
    ),
    "boolq": DataSpec(
        "aps/super_glue",
        "boolq",
        "https://storage.googleapis.com/boolq/dev.jsonl (and train.jsonl)",
        {"validation": ("dev.jsonl", "val.jsonl"), "train": ("train.jsonl",)},
        _boolq_doc,
    ),
    "piqa": DataSpec(
        "baber/piqa",
        None,
        "https://yonatanbisk.com/piqa/data/ (valid.jsonl + valid-labels.lst, train.jsonl + train-labels.lst)",
        {"validation": ("valid.jsonl",), "train": ("train.jsonl",)},
        _piqa_doc,
    ),
    "mmlu": DataSpec(
        "cais/mmlu",
        None,
        "https://people.eecs.berkeley.edu/~hendrycks/data.tar (data/dev, data/val, data/test)",
        {"test": ("*_test.csv",), "dev": ("*_dev.csv",), "validation": ("*_val.csv",)},
        _mmlu_doc,
    ),
}


# ------------------------------------------------------------------------------------------- reading files
def _read_json_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    return records


def _read_arrow_records(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return list(iter_arrow_records(path))


def iter_arrow_records(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of an ``.arrow`` file as dicts, one record batch in memory at a time."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:  # `datasets` writes the Arrow IPC stream format; plain Arrow files use the file format
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:
            yield from batch.to_pylist()


def _read_mmlu_csv(path: Path) -> list[dict[str, Any]]:
    """MMLU's published csv: no header; question, four choices, answer letter. Cells stay strings, as on the hub."""
    subject = re.sub(r"_(test|dev|val)$", "", path.stem)
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    records = []
    for line_no, row in enumerate(rows, 1):
        if len(row) != 6:
            raise SourceError(f"{path}:{line_no}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
        records.append({"question": row[0], "subject": subject, "choices": row[1:5], "answer": row[5]})
    return records


def _attach_piqa_labels(path: Path, records: list[dict[str, Any]]) -> None:
    """PIQA publishes labels beside the questions: valid.jsonl + valid-labels.lst, one 0/1 per line."""
    if all("label" in r for r in records):
        return
    labels_file = path.with_name(f"{path.stem}-labels.lst")
    if not labels_file.is_file():
        raise FileNotFoundError(
            f"{path}: PIQA's labels are in a separate file; expected {labels_file.name} beside it "
            f"(published at {DATA_SPECS['piqa'].native_url})"
        )
    labels = [line.strip() for line in labels_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(records):
        raise SourceError(f"{labels_file}: {len(labels)} labels for the {len(records)} questions in {path.name}")
    for record, label in zip(records, labels):
        record["label"] = int(label)


def read_docs(task: str, files: list[Path]) -> list[Doc]:
    """The documents of one split, in file order, with the Hugging Face columns of `task`'s dataset.

    Args:
        task: A key of `DATA_SPECS`.
        files: The split's files (one, or the shards of one split in order).

    Raises:
        SourceError: a record lacks a field the task needs, or a file is malformed; the message names the file.
    """
    spec = DATA_SPECS[task]
    docs: list[Doc] = []
    for path in files:
        if path.suffix == ".csv":
            records = _read_mmlu_csv(path)
        elif path.suffix in (".parquet", ".arrow"):
            records = _read_arrow_records(path)
        elif path.suffix in (".jsonl", ".json"):
            records = _read_json_records(path)
        else:
            raise SourceError(f"{path}: unsupported file type; use .jsonl, .json, .parquet, .arrow or MMLU's .csv")
        if task == "piqa":
            _attach_piqa_labels(path, records)
        if task == "mmlu":  # hub files of one subject's configuration may omit the column its folder names
            for record in records:
                record.setdefault("subject", path.parent.name)
        for record in records:
            docs.append(spec.to_doc(record, len(docs), f"{path} record {len(docs) + 1}"))
    return docs


# ------------------------------------------------------------------------------------------ finding files
def files_under(root: Path, depth: int = _SEARCH_DEPTH) -> list[Path]:
    """The files under `root`, `depth` levels deep, sorted, without hidden ones; symlinks are kept, not resolved."""
    found: list[Path] = []
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file():
            found.append(child)
        elif child.is_dir() and depth > 0:
            found.extend(files_under(child, depth - 1))
    return found


def hf_split_file(path: Path, split: str) -> bool:
    """Whether `path` is one of a Hugging Face split's files: hub shards, save_to_disk, or cache names."""
    name = path.name
    if re.fullmatch(rf"{split}(-\d+-of-\d+(-[0-9a-f]+)?)?\.(parquet|arrow|jsonl|json)", name):
        return True
    if re.fullmatch(rf".+-{split}(-\d+-of-\d+)?\.arrow", name):  # datasets' cache: hellaswag-validation.arrow
        return True
    return path.parent.name == split and re.fullmatch(r"data-\d+-of-\d+\.arrow", name) is not None


def _expected(task: str, split: str) -> str:
    spec = DATA_SPECS[task]
    native = " or ".join(spec.native_files.get(split, ())) or "(none published)"
    config = f", config {spec.hf_config}" if spec.hf_config else ""
    return (
        f"its published file {native} (from {spec.native_url}), or the Hugging Face {spec.hf_dataset}{config} "
        f"split '{split}' as {split}-*.parquet / {split}/*.arrow (from https://huggingface.co/datasets/{spec.hf_dataset})"
    )


def find_split_files(task: str, path: Path, split: str) -> list[Path]:
    """The files holding `split` of `task` at `path`: a directory, or one split's file with the others beside it.

    A directory is searched a few levels deep for the published file names first, then for Hugging Face split
    files; when several folders match, the one named after the dataset's configuration wins (``ARC-Easy``).
    A file stands for its split when its name is one of that split's names; other splits are looked for beside it.

    Raises:
        FileNotFoundError: nothing matches; the message says which files are expected and where they are published.
        SourceError: files of the split sit in several folders and none is preferred.
    """
    spec = DATA_SPECS[task]
    if not path.exists():
        raise FileNotFoundError(f"{task}: {path} does not exist; it should hold {_expected(task, split)}")
    root = path.parent if path.is_file() else path
    candidates = files_under(root)
    native = [p for p in candidates for pattern in spec.native_files.get(split, ()) if p.match(pattern)]
    matches = native or [p for p in candidates if hf_split_file(p, split)]
    if path.is_file() and path in matches:
        matches = [path]
    if not matches:
        raise FileNotFoundError(f"{task}: no '{split}' split under {root}; expected {_expected(task, split)}")
    folders = sorted({p.parent for p in matches})
    if task == "mmlu" and any(f.name == "all" for f in folders):  # cais/mmlu's "all" repeats every subject
        folders = [f for f in folders if f.name == "all"]
    if len(folders) > 1 and spec.hf_config:
        preferred = [f for f in folders if spec.hf_config in f.parts]
        folders = preferred or folders
    if len(folders) > 1 and task != "mmlu":
        raise SourceError(
            f"{task}: '{split}' files in several folders ({', '.join(map(str, folders))}); "
            "pass the folder of the one to use, e.g. --data " + f"{task}={folders[0]}"
        )
    return sorted(p for p in matches if p.parent in folders)


@lru_cache(maxsize=64)
def _load_split_cached(task: str, files: tuple[Path, ...], stamps: tuple[float, ...]) -> tuple[Doc, ...]:
    return tuple(read_docs(task, list(files)))


def load_split(task: str, path: str | Path, split: str) -> list[Doc]:
    """The documents of `split` of `task` found at `path`, read once and cached while the files are unchanged.

    For MMLU each document carries its ``subject``; the caller groups them. See `find_split_files`.
    """
    files = tuple(find_split_files(task, Path(path), split))
    stamps = tuple(f.stat().st_mtime for f in files)
    return list(_load_split_cached(task, files, stamps))
