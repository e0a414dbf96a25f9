"""Accuracy metrics and their standard errors, aggregated as lm-evaluation-harness 0.4.x aggregates them.

- ``acc``: the choice with the highest log-likelihood is the gold one (first on ties, as ``np.argmax``).
- ``acc_norm``: the same after dividing each log-likelihood by its choice's length in characters (lm-eval's
  ``acc_norm``; the target delimiter is not counted).
- A task's value is the mean over documents; its stderr the sample standard deviation over sqrt(n) (``N/A``,
  here None, for a single document).
- A group (MMLU) is the size-weighted mean of its subtasks, with lm-eval's pooled standard error
  ``sqrt(sum((n_i - 1) * se_i^2 * n_i) / (N - k) / N)``.
- TinyLlama's average: TinyLlama's EVAL.md "report[s] the acc_norm by default", i.e. acc_norm where lm-eval
  defines it and acc elsewhere: HellaSwag, OpenBookQA, ARC-e, ARC-c and PIQA acc_norm; WinoGrande and BoolQ acc.
  With those metrics its Pythia-1.0B row (47.16, 31.40, 53.43, 27.05, 48.99, 60.83, 69.21) averages to its 48.30.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

TINYLLAMA_COLUMNS = (
    ("hellaswag", "HellaSwag", "acc_norm"),
    ("openbookqa", "Obqa", "acc_norm"),
    ("winogrande", "WinoGrande", "acc"),
    ("arc_challenge", "ARC_c", "acc_norm"),
    ("arc_easy", "ARC_e", "acc_norm"),
    ("boolq", "boolq", "acc"),
    ("piqa", "piqa", "acc_norm"),
)
"""(task, TinyLlama's column title, metric) in the order of TinyLlama's table; its "avg" is their mean."""


def doc_metrics(
    loglikelihoods: Sequence[float], choices: Sequence[str], gold: int, metrics: Sequence[str]
) -> dict[str, float]:
    """acc (and acc_norm) of one document from its choices' log-likelihoods, as lm-eval's process_results."""
    lls = np.array(loglikelihoods, dtype=np.float64)
    out = {"acc": 1.0 if int(np.argmax(lls)) == gold else 0.0}
    if "acc_norm" in metrics:
        lengths = np.array([float(len(c)) for c in choices])
        out["acc_norm"] = 1.0 if int(np.argmax(lls / lengths)) == gold else 0.0
    return out


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard deviation over sqrt(n), lm-eval's stderr of a mean; None (lm-eval's N/A) when n < 2."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def task_result(per_doc: Sequence[dict[str, float]], metrics: Sequence[str]) -> dict[str, float | int | None]:
    """{metric: mean, metric_stderr: stderr, ..., "n": documents} of one task."""
    out: dict[str, float | int | None] = {}
    for metric in metrics:
        values = [d[metric] for d in per_doc]
        out[metric] = sum(values) / len(values)
        out[f"{metric}_stderr"] = mean_stderr(values)
    out["n"] = len(per_doc)
    return out


def group_result(
    subtasks: Sequence[dict[str, float | int | None]], metric: str = "acc"
) -> dict[str, float | int | None]:
    """A size-weighted group of subtask results (lm-eval's ``weight_by_size: true``) with its pooled stderr."""
    sizes = [int(r["n"]) for r in subtasks]  # type: ignore[arg-type]
    values = [float(r[metric]) for r in subtasks]  # type: ignore[arg-type]
    stderrs = [r[f"{metric}_stderr"] for r in subtasks]
    total = sum(sizes)
    out: dict[str, float | int | None] = {metric: sum(v * n for v, n in zip(values, sizes)) / total}
    if any(s is None for s in stderrs) or total == len(sizes):
        out[f"{metric}_stderr"] = None
    else:
        pooled = sum((n - 1) * float(s) ** 2 * n for n, s in zip(sizes, stderrs)) / (total - len(sizes))  # type: ignore[arg-type]
        out[f"{metric}_stderr"] = math.sqrt(pooled / total)
    out["n"] = total
    out["subtasks"] = len(subtasks)
    return out


def tinyllama_average(results: dict[str, dict]) -> dict[str, object] | None:
    """Mean of TinyLlama's per-task metrics over the tasks present, or None if none of them is."""
    used = {task: metric for task, _, metric in TINYLLAMA_COLUMNS if task in results}
    if not used:
        return None
    values = [results[task][metric] for task, metric in used.items()]
    return {"value": sum(values) / len(values), "metrics": used, "complete": len(used) == len(TINYLLAMA_COLUMNS)}
