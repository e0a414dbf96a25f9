"""Evaluation results as Markdown: TinyLlama's summary row, lm-eval's task/metric table, and two runs side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llamita.data.sources import SourceError
from llamita.evaluate.metrics import TINYLLAMA_COLUMNS


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for every task and metric; MMLU subjects after their group, indented."""
    rows = []
    for task, result in results.items():
        label = f"- {task[len('mmlu_') :]}" if task.startswith("mmlu_") else task
        for metric in ("acc", "acc_norm"):
            if metric in result:
                rows.append((label, metric, result[metric], result.get(f"{metric}_stderr")))
    return rows


def _ordered(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tasks in TinyLlama's column order, then MMLU and its subjects."""
    order = [task for task, _, _ in TINYLLAMA_COLUMNS]
    first = {t: results[t] for t in order if t in results}
    rest = {t: r for t, r in results.items() if t not in first and not t.startswith("mmlu_")}
    subjects = {t: r for t, r in sorted(results.items()) if t.startswith("mmlu_")}
    return {**first, **rest, **subjects}


def tinyllama_table(evaluation: dict[str, Any], name: str) -> str:
    """TinyLlama's EVAL.md table (values in %): HellaSwag | Obqa | WinoGrande | ARC_c | ARC_e | boolq | piqa | avg."""
    results = evaluation["results"]
    header = ["Model", *(title for _, title, _ in TINYLLAMA_COLUMNS), "avg"]
    cells = [name, *(_pct(results[t][m]) if t in results else "" for t, _, m in TINYLLAMA_COLUMNS)]
    average = evaluation.get("average")
    cells.append(_pct(average["value"]) if average else "")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(cells) + " |"]
    if average and not average["complete"]:
        lines.append(f"\navg over {', '.join(average['metrics'])} only (not all seven tasks were run).")
    return "\n".join(lines)


def task_table(evaluation: dict[str, Any]) -> str:
    """lm-eval's layout: | Task | Metric | Value | Stderr | with values in %."""
    lines = ["| Task | Metric | Value | Stderr |", "|---|---|---:|---:|"]
    for task, metric, value, stderr in _rows(_ordered(evaluation["results"])):
        lines.append(f"| {task} | {metric} | {_pct(value)} | {'± ' + _pct(stderr) if stderr is not None else 'N/A'} |")
    return "\n".join(lines)


def markdown(evaluation: dict[str, Any], name: str) -> str:
    """Both tables with a line saying how the numbers were made."""
    shots = evaluation["num_fewshot"]
    limit = evaluation.get("limit")
    note = f"{shots}-shot, lm-evaluation-harness 0.4 prompts and metrics" + (f", limit {limit}" if limit else "")
    return f"{tinyllama_table(evaluation, name)}\n\n{task_table(evaluation)}\n\n{note}\n"


def compare(a_path: str | Path, b_path: str | Path) -> str:
    """Two `llamita evaluate --out` results side by side: | Task | Metric | A | B | B - A |, in %."""
    runs = []
    for path in (a_path, b_path):
        try:
            runs.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: not a results JSON written by `llamita evaluate --out` ({e})") from None
        if "results" not in runs[-1]:
            raise SourceError(f"{path}: no 'results' object; was it written by `llamita evaluate --tasks ... --out`?")
    a, b = runs
    rows_a = {(t, m): (v, s) for t, m, v, s in _rows(_ordered(a["results"]))}
    rows_b = {(t, m): (v, s) for t, m, v, s in _rows(_ordered(b["results"]))}
    average = ("avg (TinyLlama)", "acc_norm/acc")
    for rows, run in ((rows_a, a), (rows_b, b)):
        if run.get("average"):
            rows[average] = (run["average"]["value"], None)
    keys = [k for k in dict.fromkeys([*rows_a, *rows_b]) if k != average]
    keys += [average] if average in rows_a or average in rows_b else []
    names = [Path(a_path).stem, Path(b_path).stem]
    lines = [f"| Task | Metric | {names[0]} | {names[1]} | Δ |", "|---|---|---:|---:|---:|"]
    for key in keys:
        va = rows_a.get(key, (None, None))[0]
        vb = rows_b.get(key, (None, None))[0]
        delta = f"{100 * (vb - va):+.2f}" if va is not None and vb is not None else ""
        lines.append(f"| {key[0]} | {key[1]} | {_pct(va)} | {_pct(vb)} | {delta} |")
    return "\n".join(lines)
