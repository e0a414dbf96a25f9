"""Evaluate a model on the multiple-choice suite: documents -> prompts -> scored requests -> metrics.

`evaluate_tasks` is the one entry point, used by `llamita evaluate --tasks` and callable from a training loop.
All requests of all tasks are scored together, so batches stay full across task boundaries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llamita.data.sources import SourceError
from llamita.evaluate.metrics import doc_metrics, group_result, task_result, tinyllama_average
from llamita.evaluate.prompts import FEWSHOT_SEED, FewshotSampler, Prompt, build_prompt
from llamita.evaluate.scoring import encode_pairs, score_pairs
from llamita.evaluate.task_data import Doc, load_split
from llamita.evaluate.tasks import SUITE, TASKS, TaskSpec, mmlu_subject_task
from llamita.model.llama import Llama
from llamita.tokenizer import Tokenizer


@dataclass(frozen=True)
class _Item:
    """One evaluated document: its task, position, prompt, and where its requests start in the flat list."""

    task: TaskSpec
    doc_id: int
    prompt: Prompt
    first_request: int


def _sample_size(n_docs: int, limit: float | None) -> int:
    """lm-eval's --limit: a count, or below 1 a fraction of the documents (rounded up); 0 or None: all."""
    if not limit:
        return n_docs
    return min(n_docs, math.ceil(n_docs * limit) if limit < 1 else int(limit))


def _subtasks(name: str, path: str | Path, num_fewshot: int) -> list[tuple[TaskSpec, list[Doc], list[Doc]]]:
    """(task, evaluated documents, few-shot pool) of `name`; MMLU gives one per subject found on disk."""
    if name not in SUITE:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(SUITE)}")
    if name != "mmlu":
        task = TASKS[name]
        docs = load_split(task.data, path, task.eval_split)
        if not docs:
            raise SourceError(f"{name}: the {task.eval_split} split at {path} holds no documents")
        pool = load_split(task.data, path, task.fewshot_split) if num_fewshot else []
        return [(task, docs, pool)]
    by_subject: dict[str, list[Doc]] = {}
    for doc in load_split("mmlu", path, "test"):
        by_subject.setdefault(doc["subject"], []).append(doc)
    if not by_subject:
        raise SourceError(f"mmlu: the test split at {path} holds no documents")
    shots: dict[str, list[Doc]] = {}
    for doc in load_split("mmlu", path, "dev") if num_fewshot else []:
        shots.setdefault(doc["subject"], []).append(doc)
    return [(mmlu_subject_task(s), by_subject[s], shots.get(s, [])) for s in sorted(by_subject)]


def _build_items(
    tasks: Mapping[str, str | Path], num_fewshot: int, limit: float | None, seed: int = FEWSHOT_SEED
) -> tuple[dict[str, list[str]], list[_Item], list[tuple[str, str]]]:
    """Every document's prompt and the flat list of (context, continuation) requests.

    Returns:
        ({task: its subtask names}, items, requests).
    """
    groups: dict[str, list[str]] = {}
    items: list[_Item] = []
    requests: list[tuple[str, str]] = []
    for name, path in tasks.items():
        groups[name] = []
        for task, docs, pool in _subtasks(name, path, num_fewshot):
            groups[name].append(task.name)
            sampler = FewshotSampler(task, pool, seed)
            for doc_id, doc in enumerate(docs[: _sample_size(len(docs), limit)]):
                prompt = build_prompt(task, doc, sampler.sample(num_fewshot, doc))
                items.append(_Item(task, doc_id, prompt, len(requests)))
                requests.extend(prompt.requests)
    return groups, items, requests


@contextmanager
def _progress_bar(enabled: bool, total: int, description: str) -> Iterator[Any]:
    """A rich progress bar counting documents, with documents/s; yields its advance(n) function."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class ItemsPerSecond(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0:.1f} items/s")

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        ItemsPerSecond(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        bar = progress.add_task(description, total=total)
        yield lambda n: progress.advance(bar, n)


def _device_and_dtype(model: Llama, device: torch.device | str | None, dtype: torch.dtype | None) -> torch.dtype | None:
    weight = model.lm_head.weight
    if device is not None and torch.device(device).type != weight.device.type:
        raise ValueError(f"the model is on {weight.device}, not {device}; move it first")
    if dtype is None and weight.device.type == "cuda" and weight.dtype == torch.float32:
        return torch.bfloat16  # bf16 autocast on GPU, as lm-eval is usually run (dtype=bfloat16)
    return dtype


def evaluate_tasks(
    model: Llama,
    tokenizer: Tokenizer,
    tasks: Mapping[str, str | Path],
    limit: float | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    *,
    num_fewshot: int = 0,
    fewshot_seed: int = FEWSHOT_SEED,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Score `model` on multiple-choice tasks exactly as lm-evaluation-harness 0.4.x does.

    Safe to call from a training loop: the model stays where it is, its train/eval mode is restored, and the
    task files are read once per process. An FSDP2-sharded model (llamita.train.parallel) is gathered for the
    call, which every rank must then make with the same arguments; torch.compile'd blocks run eagerly.

    Args:
        model: The language model.
        tokenizer: Its tokenizer.
        tasks: Task name (see `llamita.evaluate.tasks.SUITE`) -> its data directory or evaluated-split file.
        limit: Documents per task (per MMLU subject), or below 1 a fraction of them; None for all.
        batch_size: Continuations per forward pass.
        device: Where the model is (checked); None: wherever it is.
        num_fewshot: Solved examples before each question.
        fewshot_seed: Seed of the few-shot draw (lm-eval's default 1234).
        autocast_dtype: Autocast dtype; None: bf16 for fp32 weights on GPU, else the weights' dtype.
        progress: Show a progress bar with documents/s.
        log_samples: Also return every document's requests and log-likelihoods under "samples".

    Returns:
        {"results": {task: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n"}}, with MMLU as the
        "mmlu" group plus one "mmlu_<subject>" entry each; "average": TinyLlama's average (see
        `llamita.evaluate.metrics`); "num_fewshot", "fewshot_seed", "limit", "documents", "requests",
        "seconds", "documents_per_s"; and "samples" when asked.

    Raises:
        FileNotFoundError: a task's files are missing; the message names the files and where they are published.
        ValueError: an unknown task.
        llamita.data.sources.SourceError: malformed data, an answer not among the choices, or more shots asked
            than a few-shot split holds.
    """
    autocast_dtype = _device_and_dtype(model, device, autocast_dtype)
    groups, items, requests = _build_items(tasks, num_fewshot, limit, fewshot_seed)
    start = time.perf_counter()
    pairs = encode_pairs(tokenizer, requests)
    owner = [k for k, item in enumerate(items) for _ in item.prompt.requests]  # request -> item
    remaining = [len(item.prompt.requests) for item in items]
    was_training = model.training
    model.eval()
    try:
        with _progress_bar(progress, len(items), "evaluating") as advance:

            def on_batch(done: list[int]) -> None:
                finished = 0
                for i in done:
                    remaining[owner[i]] -= 1
                    finished += remaining[owner[i]] == 0
                advance(finished)

            scores = score_pairs(model, pairs, batch_size=batch_size, autocast_dtype=autocast_dtype, on_batch=on_batch)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start

    per_doc: dict[str, list[dict[str, float]]] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        span = scores[item.first_request : item.first_request + len(item.prompt.requests)]
        lls = [lp for lp, _ in span]
        metrics = doc_metrics(lls, item.prompt.choices, item.prompt.gold, item.task.metrics)
        per_doc.setdefault(item.task.name, []).append(metrics)
        if log_samples:
            samples.setdefault(item.task.name, []).append(
                {
                    "doc_id": item.doc_id,
                    "arguments": [list(r) for r in item.prompt.requests],
                    "loglikelihoods": lls,
                    "is_greedy": [g for _, g in span],
                    "gold": item.prompt.gold,
                    **metrics,
                }
            )

    results: dict[str, dict[str, Any]] = {}
    specs = {item.task.name: item.task for item in items}
    for name, subtasks in groups.items():
        for sub in subtasks:
            results[sub] = task_result(per_doc[sub], specs[sub].metrics)
        if name == "mmlu":
            results[name] = group_result([results[s] for s in subtasks])
    out: dict[str, Any] = {
        "results": results,
        "average": tinyllama_average(results),
        "num_fewshot": num_fewshot,
        "fewshot_seed": fewshot_seed,
        "limit": limit,
        "documents": len(items),
        "requests": len(requests),
        "seconds": seconds,
        "documents_per_s": len(items) / seconds if seconds > 0 else None,
    }
    if log_samples:
        out["samples"] = samples
    return out


def scalar_metrics(evaluation: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Flat {"eval/hellaswag/acc_norm": value, ..., "eval/tinyllama_avg": value} for metric loggers."""
    flat: dict[str, float] = {}
    for task, result in evaluation["results"].items():
        if task.startswith("mmlu_"):
            continue  # 57 subjects would drown the dashboard; "mmlu" carries their aggregate
        for metric in ("acc", "acc_norm"):
            if metric in result:
                flat[f"{prefix}/{task}/{metric}"] = float(result[metric])
    if evaluation.get("average"):
        flat[f"{prefix}/tinyllama_avg"] = float(evaluation["average"]["value"])
    return flat
