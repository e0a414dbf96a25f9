"""The zero-shot multiple-choice suite (TinyLlama's, plus MMLU) as lm-evaluation-harness 0.4.x defines it.

Each task is lm-eval's task YAML written as three functions of a document (which has the Hugging Face dataset's
columns, see `llamita.evaluate.task_data`):

- ``text(doc)``: the question, lm-eval's ``doc_to_text``; for WinoGrande the index of the correct context;
- ``choices(doc)``: the candidate continuations, lm-eval's ``doc_to_choice``; for WinoGrande the contexts;
- ``target(doc)``: lm-eval's ``doc_to_target``: the index of the correct choice; for WinoGrande the continuation.

plus the splits (evaluated; few-shot pool), the few-shot sampler and the metrics. The prompt strings here are
lm-eval's Jinja templates rendered by hand; tests compare every request with lm-eval's own.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Doc = dict[str, Any]


@dataclass(frozen=True)
class TaskSpec:
    """One multiple-choice task.

    Attributes:
        name: lm-eval's task name (``arc_easy``; ``mmlu_<subject>`` for an MMLU subject).
        data: The key of `llamita.evaluate.task_data.DATA_SPECS` that reads its files.
        eval_split: The split scored (lm-eval: test_split, else validation_split).
        fewshot_split: The split few-shot examples come from (lm-eval: fewshot_split, else training_split).
        exclude_eval_doc: Whether the sampler draws one extra example and drops the evaluated document. lm-eval
            does this when the task's fewshot_split equals its test_split, which includes both being unset.
        first_n: Few-shot examples are the split's first n (MMLU's ``first_n`` sampler), not a random draw.
        metrics: ``acc``, and ``acc_norm`` where lm-eval's YAML lists it.
        text: lm-eval's doc_to_text.
        choices: lm-eval's doc_to_choice.
        target: lm-eval's doc_to_target.
        multiple_input: WinoGrande's layout: one context per choice, one shared continuation.
        description: Text before the few-shot examples (MMLU's "The following are ...").
    """

    name: str
    data: str
    eval_split: str
    fewshot_split: str
    exclude_eval_doc: bool
    first_n: bool
    metrics: tuple[str, ...]
    text: Callable[[Doc], str | int]
    choices: Callable[[Doc], list[str]]
    target: Callable[[Doc], int | str]
    multiple_input: bool = False
    description: str = ""


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: strip, " [title]" -> ". ", drop WikiHow's [bracketed] tags, fold double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_query(doc: Doc) -> str:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return hellaswag_preprocess(doc["activity_label"] + ": " + context)


def _winogrande_contexts(doc: Doc) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _winogrande_continuation(doc: Doc) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def _mmlu_text(doc: Doc) -> str:
    a, b, c, d = doc["choices"]
    return f"{doc['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def _arc_target(doc: Doc, key: str) -> int:
    return doc["choices"]["label"].index(key)


_ACC = ("acc",)
_ACC_NORM = ("acc", "acc_norm")

TASKS: dict[str, TaskSpec] = {
    "hellaswag": TaskSpec(
        name="hellaswag",
        data="hellaswag",
        eval_split="validation",
        fewshot_split="train",
        exclude_eval_doc=True,
        first_n=False,
        metrics=_ACC_NORM,
        text=_hellaswag_query,
        choices=lambda doc: [hellaswag_preprocess(ending) for ending in doc["endings"]],
        target=lambda doc: int(doc["label"]),
    ),
    "openbookqa": TaskSpec(
        name="openbookqa",
        data="openbookqa",
        eval_split="test",
        fewshot_split="train",
        exclude_eval_doc=False,
        first_n=False,
        metrics=_ACC_NORM,
        text=lambda doc: doc["question_stem"],
        choices=lambda doc: list(doc["choices"]["text"]),
        target=lambda doc: _arc_target(doc, doc["answerKey"].lstrip()),
    ),
    "winogrande": TaskSpec(
        name="winogrande",
        data="winogrande",
        eval_split="validation",
        fewshot_split="train",
        exclude_eval_doc=True,
        first_n=False,
        metrics=_ACC,
        text=lambda doc: {"1": 0, "2": 1}[doc["answer"]],
        choices=_winogrande_contexts,
        target=_winogrande_continuation,
        multiple_input=True,
    ),
    "arc_easy": TaskSpec(
        name="arc_easy",
        data="arc_easy",
        eval_split="test",
        fewshot_split="train",
        exclude_eval_doc=False,
        first_n=False,
        metrics=_ACC_NORM,
        text=lambda doc: f"Question: {doc['question']}\nAnswer:",
        choices=lambda doc: list(doc["choices"]["text"]),
        target=lambda doc: _arc_target(doc, doc["answerKey"]),
    ),
    "arc_challenge": TaskSpec(
        name="arc_challenge",
        data="arc_challenge",
        eval_split="test",
        fewshot_split="train",
        exclude_eval_doc=False,
        first_n=False,
        metrics=_ACC_NORM,
        text=lambda doc: f"Question: {doc['question']}\nAnswer:",
        choices=lambda doc: list(doc["choices"]["text"]),
        target=lambda doc: _arc_target(doc, doc["answerKey"]),
    ),
    "boolq": TaskSpec(
        name="boolq",
        data="boolq",
        eval_split="validation",
        fewshot_split="train",
        exclude_eval_doc=True,
        first_n=False,
        metrics=_ACC,
        text=lambda doc: f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
        choices=lambda doc: ["no", "yes"],
        target=lambda doc: doc["label"],
    ),
    "piqa": TaskSpec(
        name="piqa",
        data="piqa",
        eval_split="validation",
        fewshot_split="train",
        exclude_eval_doc=True,
        first_n=False,
        metrics=_ACC_NORM,
        text=lambda doc: f"Question: {doc['goal']}\nAnswer:",
        choices=lambda doc: [doc["sol1"], doc["sol2"]],
        target=lambda doc: doc["label"],
    ),
}

SUITE = ("hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa", "mmlu")
"""Every task name `llamita evaluate --tasks` accepts; ``mmlu`` stands for all its subjects found on disk."""


def mmlu_subject_task(subject: str) -> TaskSpec:
    """lm-eval's ``mmlu_<subject>`` task: the test split scored, the dev split's first examples as shots."""
    topic = " ".join(subject.split("_"))
    return TaskSpec(
        name=f"mmlu_{subject}",
        data="mmlu",
        eval_split="test",
        fewshot_split="dev",
        exclude_eval_doc=False,
        first_n=True,
        metrics=_ACC,
        text=_mmlu_text,
        choices=lambda doc: ["A", "B", "C", "D"],
        target=lambda doc: doc["answer"],
        description=f"The following are multiple choice questions (with answers) about {topic}.\n\n",
    )
