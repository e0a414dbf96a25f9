"""Documents of every task, written as the datasets publish them and as Hugging Face jsonl, and lm-eval YAMLs.

Each task's documents are written twice: in the dataset's own published format (read by llamita) and with the
Hugging Face columns as jsonl (read by lm-evaluation-harness through task YAMLs that `include` lm-eval's own YAML
and change only where the data comes from). The parity tests then run both on the same documents.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# Every task's documents with the Hugging Face columns, per split. Validation/test docs repeat one training doc
# where lm-eval's sampler must drop the evaluated document from its own draw (HellaSwag, WinoGrande, BoolQ, PIQA).
PASSAGE = (
    "The river flows from the mountains to the sea, and in spring the melting snow makes it rise over its banks. "
    "Farmers along the valley plant late, after the water goes down, and the soil left behind is rich."
)


def _hellaswag(i: int, split: str, label: int) -> dict[str, Any]:
    topics = ["Cooking", "Washing dishes", "Home and Garden", "Playing guitar", "Making a sandwich", "Running"]
    return {
        "ind": 100 + i,
        "activity_label": topics[i % len(topics)],
        "ctx_a": f" A woman [title] stands in a kitchen number {i}.  She picks up a knife.",
        "ctx_b": "then she" if i % 2 else "the man",
        "ctx": "unused",
        "endings": [
            "cuts the onions into  small pieces.",
            "walks the dog [header] out of the room.",
            f"sings a song about the number {i}.",
            "[step] puts the knife back and leaves.",
        ],
        "source_id": f"wikihow~{i}",
        "split": split,
        "split_type": "indomain" if i % 3 else "zeroshot",
        "label": str(label),
    }


def _arc(i: int, n_choices: int, numeric: bool) -> dict[str, Any]:
    labels = [str(k + 1) for k in range(n_choices)] if numeric else list("ABCDE"[:n_choices])
    texts = ["the sun", "a rock falling", "water boiling on a stove", "plants growing", "ice melting"][:n_choices]
    return {
        "id": f"Mercury_{i}",
        "question": f"Which of these is an example of energy change number {i}?",
        "choices": {"text": texts, "label": labels},
        "answerKey": labels[i % n_choices],
    }


def _obqa(i: int) -> dict[str, Any]:
    return {
        "id": f"{i}-abc",
        "question_stem": f"A bird building a nest in tree {i} is most likely",
        "choices": {"text": ["hungry", "preparing for eggs", "lost", "sleeping"], "label": ["A", "B", "C", "D"]},
        "answerKey": "ABCD"[(i + 1) % 4],
    }


def _winogrande(i: int) -> dict[str, Any]:
    names = [("Sarah", "Maria"), ("the trophy", "the suitcase"), ("Kevin", "Ian")]
    a, b = names[i % len(names)]
    return {
        "sentence": f"{a} gave {b} the book number {i} because _ had already read it twice.",
        "option1": a,
        "option2": b,
        "answer": "1" if i % 2 else "2",
    }


def _boolq(i: int, idx: int) -> dict[str, Any]:
    return {
        "question": f"does the river rise in spring {i}",
        "passage": PASSAGE + f" Section {i}.",
        "idx": idx,
        "label": i % 2,
    }


def _piqa(i: int) -> dict[str, Any]:
    return {
        "goal": f"How do I keep bread {i} fresh?",
        "sol1": "Put it in a sealed bag.",
        "sol2": "Leave it open on the counter in the sun.",
        "label": i % 2,
    }


def _mmlu(subject: str, i: int) -> dict[str, Any]:
    return {
        "question": f"  Which part of the {subject.replace('_', ' ')} question {i} is right? ",
        "subject": subject,
        "choices": [f"option {i}", "all of the above", "none", "1.0"],
        "answer": i % 4,
    }


def _task_docs() -> dict[str, dict[str, list[dict[str, Any]]]]:
    hs_train = [_hellaswag(i, "train", i % 4) for i in range(6)]
    wg_train = [_winogrande(i) for i in range(5)]
    bq_train = [_boolq(i, i) for i in range(5)]
    pq_train = [_piqa(i) for i in range(5)]
    arc_easy = {
        "train": [_arc(i, 4, i == 2) for i in range(5)],
        "test": [_arc(10 + i, 3 + i % 3, i == 1) for i in range(5)],
    }
    arc_challenge = {
        "train": [_arc(20 + i, 4, False) for i in range(4)],
        "test": [_arc(30 + i, 4, True) for i in range(4)],
    }
    mmlu = {
        split: [_mmlu(s, i + offset) for s in ("anatomy", "high_school_physics") for i in range(n)]
        for split, n, offset in (("dev", 3, 0), ("test", 4, 10))
    }
    return {
        "hellaswag": {
            "train": hs_train,
            "validation": [*(_hellaswag(i, "val", (i + 1) % 4) for i in range(6, 10)), hs_train[1]],
        },
        "arc_easy": {**arc_easy, "validation": arc_easy["train"][:2]},
        "arc_challenge": {**arc_challenge, "validation": arc_challenge["train"][:2]},
        "openbookqa": {
            "train": [_obqa(i) for i in range(5)],
            "test": [_obqa(10 + i) for i in range(4)],
            "validation": [_obqa(20)],
        },
        "winogrande": {"train": wg_train, "validation": [_winogrande(10 + i) for i in range(4)] + [wg_train[0]]},
        "boolq": {"train": bq_train, "validation": [_boolq(10 + i, i) for i in range(4)] + [bq_train[2] | {"idx": 4}]},
        "piqa": {"train": pq_train, "validation": [_piqa(10 + i) for i in range(4)] + [pq_train[3]]},
        "mmlu": mmlu,
    }


TASK_DOCS = _task_docs()


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _arc_native(doc: dict[str, Any], stem_key: str) -> dict[str, Any]:
    choices = [{"text": t, "label": lab} for t, lab in zip(doc["choices"]["text"], doc["choices"]["label"])]
    return {"id": doc["id"], "question": {"stem": doc[stem_key], "choices": choices}, "answerKey": doc["answerKey"]}


def write_native(root: Path) -> dict[str, Path]:
    """Each task's documents in its published layout; returns task -> the directory to pass as --data."""
    docs = TASK_DOCS
    out = {}
    d = out["hellaswag"] = root / "hellaswag"
    for split, name in (("validation", "val"), ("train", "train")):
        _write_jsonl(d / f"hellaswag_{name}.jsonl", [r | {"label": int(r["label"])} for r in docs["hellaswag"][split]])
    for task, folder in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        d = out[task] = root / "ARC-V1-Feb2018-2" / folder
        for split, name in (("test", "Test"), ("train", "Train"), ("validation", "Dev")):
            _write_jsonl(d / f"{folder}-{name}.jsonl", [_arc_native(r, "question") for r in docs[task][split]])
    d = out["openbookqa"] = root / "OpenBookQA-V1-Sep2018" / "Data" / "Main"
    for split, name in (("test", "test"), ("train", "train"), ("validation", "dev")):
        _write_jsonl(d / f"{name}.jsonl", [_arc_native(r, "question_stem") for r in docs["openbookqa"][split]])
    d = out["winogrande"] = root / "winogrande_1.1"
    for split, name in (("validation", "dev"), ("train", "train_xl")):
        _write_jsonl(d / f"{name}.jsonl", [{"qID": f"q{i}", **r} for i, r in enumerate(docs["winogrande"][split])])
    d = out["boolq"] = root / "boolq"
    for split, name in (("validation", "dev"), ("train", "train")):
        rows = [
            {"question": r["question"], "title": "river", "answer": bool(r["label"]), "passage": r["passage"]}
            for r in docs["boolq"][split]
        ]
        _write_jsonl(d / f"{name}.jsonl", rows)
    d = out["piqa"] = root / "piqa"
    for split, name in (("validation", "valid"), ("train", "train")):
        rows = docs["piqa"][split]
        _write_jsonl(
            d / f"{name}.jsonl",
            [{"id": f"p{i}", "goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"]} for i, r in enumerate(rows)],
        )
        (d / f"{name}-labels.lst").write_text("".join(f"{r['label']}\n" for r in rows), encoding="utf-8")
    d = out["mmlu"] = root / "mmlu" / "data"
    for split in ("dev", "test"):
        (d / split).mkdir(parents=True, exist_ok=True)
        for subject in ("anatomy", "high_school_physics"):
            with (d / split / f"{subject}_{split}.csv").open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                for r in docs["mmlu"][split]:
                    if r["subject"] == subject:
                        writer.writerow([r["question"], *r["choices"], "ABCD"[r["answer"]]])
    return out


def write_hf_jsonl(root: Path) -> dict[str, dict[str, Path]]:
    """Each split as jsonl with the Hugging Face columns (what lm-eval reads); task -> split -> file."""
    out: dict[str, dict[str, Path]] = {}
    for task, splits in TASK_DOCS.items():
        if task == "mmlu":
            for subject in ("anatomy", "high_school_physics"):
                out[f"mmlu_{subject}"] = {
                    split: _write_jsonl(
                        root / task / subject / f"{split}.jsonl", [r for r in rows if r["subject"] == subject]
                    )
                    for split, rows in splits.items()
                }
        else:
            out[task] = {split: _write_jsonl(root / task / f"{split}.jsonl", rows) for split, rows in splits.items()}
    return out


LM_EVAL_YAMLS = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "mmlu_anatomy": "mmlu/default/mmlu_anatomy.yaml",
    "mmlu_high_school_physics": "mmlu/default/mmlu_high_school_physics.yaml",
}


def write_lm_eval_yamls(root: Path, files: dict[str, dict[str, Path]]) -> list[str]:
    """lm-eval task YAMLs ``fx_<task>``: lm-eval's own YAML with only the data source changed; the task names."""
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    root.mkdir(parents=True, exist_ok=True)
    for task, base in LM_EVAL_YAMLS.items():
        data_files = "\n".join(f"    {split}: {path}" for split, path in files[task].items())
        (root / f"fx_{task}.yaml").write_text(
            f"include: {tasks_dir / base}\ntask: fx_{task}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n{data_files}\n",
            encoding="utf-8",
        )
    (root / "fx_mmlu.yaml").write_text(
        "group: fx_mmlu\ntask:\n  - fx_mmlu_anatomy\n  - fx_mmlu_high_school_physics\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n",
        encoding="utf-8",
    )
    return [f"fx_{t}" for t in LM_EVAL_YAMLS if not t.startswith("mmlu_")] + ["fx_mmlu"]


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a busy machine two threads can be 50x slower (spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
