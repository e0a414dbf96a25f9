"""Prompts of a multiple-choice task with k shots, built as lm-evaluation-harness 0.4.x builds them.

Few-shot examples are drawn per task from one ``random.Random(seed)`` (lm-eval's ``fewshot_random_seed``, 1234),
consumed document by document in evaluation order, exactly as lm-eval's default ``ContextSampler`` consumes it:
``sample(pool, k)``, or ``sample(pool, k + 1)`` minus the evaluated document when the task's few-shot split is
(by lm-eval's rule) its evaluated split. MMLU takes the first k of its dev split.

A prompt is ``description + shots + question``; a shot is ``question + " " + answer + "\\n\\n"``. Each choice
becomes one (context, continuation) request, the continuation starting with the target delimiter " ".
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from llamita.data.sources import SourceError
from llamita.evaluate.tasks import Doc, TaskSpec

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
FEWSHOT_SEED = 1234
"""lm-eval's default ``fewshot_random_seed``."""


@dataclass(frozen=True)
class Prompt:
    """One document's requests: ``requests[i]`` = (context, continuation) scored for choice i."""

    requests: list[tuple[str, str]]
    choices: list[str]
    """lm-eval's doc_to_choice; acc_norm divides by their lengths in characters."""
    gold: int


class FewshotSampler:
    """Draws few-shot documents for one task as lm-eval's sampler does, from one seeded generator."""

    def __init__(self, task: TaskSpec, pool: Sequence[Doc], seed: int = FEWSHOT_SEED) -> None:
        self.task = task
        self.pool = pool
        self.rng = random.Random(seed)

    def sample(self, k: int, doc: Doc) -> list[Doc]:
        """The k shots for `doc`; call once per evaluated document, in evaluation order.

        Raises:
            SourceError: the few-shot split holds fewer than k documents.
        """
        if k == 0:
            return []
        if k > len(self.pool):
            raise SourceError(
                f"{self.task.name}: {k} shots asked; its {self.task.fewshot_split} split has {len(self.pool)} documents"
            )
        if self.task.first_n:
            return list(self.pool[:k])
        # random.sample picks the same positions from any sequence of a given length, so indices stand in for docs.
        indices = range(len(self.pool))
        if not self.task.exclude_eval_doc:
            return [self.pool[i] for i in self.rng.sample(indices, k)]
        # Drawing k + 1 leaves room to drop the evaluated document, should the pool contain it.
        shots = [self.pool[i] for i in self.rng.sample(indices, k + 1) if self.pool[i] != doc][:k]
        if len(shots) < k:  # the pool held copies of the document; lm-eval redraws from the pool without them
            others = [i for i in indices if self.pool[i] != doc]
            shots = [self.pool[i] for i in self.rng.sample(others, k)]
        return shots


def _shot(task: TaskSpec, doc: Doc) -> str:
    """A solved example: question, delimiter, answer, separator (the delimiter only when there is an answer)."""
    choices = task.choices(doc)
    if task.multiple_input:
        question, answer = choices[task.text(doc)], task.target(doc)
    else:
        target = task.target(doc)
        question, answer = task.text(doc), choices[target] if isinstance(target, int) else target
    if answer == "":
        return question
    return question + TARGET_DELIMITER + answer + FEWSHOT_DELIMITER


def build_prompt(task: TaskSpec, doc: Doc, shots: list[Doc]) -> Prompt:
    """The requests lm-eval sends for `doc` after `shots`, and the index of the correct choice.

    Raises:
        SourceError: the gold answer is not among the choices; the message shows the document.
    """
    prefix = task.description + "".join(_shot(task, shot) for shot in shots)
    choices = task.choices(doc)
    if task.multiple_input:
        continuation = TARGET_DELIMITER + task.target(doc)
        requests = [(prefix + context, continuation) for context in choices]
        gold = task.text(doc)
    else:
        context = prefix + task.text(doc)
        requests = [(context, TARGET_DELIMITER + choice) for choice in choices]
        gold = task.target(doc)
        if isinstance(gold, str):
            gold = choices.index(gold) if gold in choices else -1
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise SourceError(f"{task.name}: the answer {gold!r} is not one of the {len(choices)} choices of {doc}")
    return Prompt(requests, choices, gold)
