"""The entry functions of `llamita evaluate`: load a checkpoint, evaluate it, and write the results.

Three measurements, each a function: multiple-choice tasks (`run_tasks`), perplexity of raw text files
(`run_text`) and validation loss on held-out token shards (`run_shards`, the run's own sources by default).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from llamita.config import ConfigError
from llamita.data.sources import expand_inputs
from llamita.evaluate.harness import evaluate_tasks
from llamita.evaluate.load_model import LoadedModel, is_hf_directory, load_model
from llamita.evaluate.perplexity import text_perplexity, validation_loss
from llamita.evaluate.report import markdown
from llamita.evaluate.tasks import SUITE

DEFAULT_DATA_ROOT = Path("data/eval")
"""Where a task's files are looked for when no --data TASK=PATH names them: data/eval/<task>/."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a GPU (as lm-eval is usually run) and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def task_paths(names: list[str], data: dict[str, str]) -> dict[str, Path]:
    """Task -> its data path: the --data TASK=PATH given, else data/eval/<task>.

    Raises:
        ConfigError: an unknown task name, or data given for a task not asked for.
    """
    unknown = [n for n in [*names, *data] if n not in SUITE]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(SUITE)}")
    extra = sorted(set(data) - set(names))
    if extra:
        raise ConfigError(f"--data given for {', '.join(extra)}, which --tasks does not list")
    return {name: Path(data.get(name, DEFAULT_DATA_ROOT / name)) for name in names}


def _describe(loaded: LoadedModel, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    config = loaded.model.config
    return {
        "checkpoint": str(loaded.source),
        "step": loaded.step,
        "parameters": config.num_params,
        "max_seq_len": config.max_seq_len,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }


def _write(result: dict[str, Any], out: str | None, text: str | None = None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        if text is not None:
            Path(out).with_suffix(".md").write_text(text, encoding="utf-8")


def run_tasks(
    checkpoint: str,
    tasks: dict[str, Path],
    *,
    device: torch.device,
    dtype: torch.dtype,
    num_fewshot: int,
    limit: float | None,
    batch_size: int,
    out: str | None,
) -> str:
    """Multiple-choice evaluation of a checkpoint; writes JSON (and a .md beside it) to `out`; returns the Markdown."""
    loaded = load_model(checkpoint, device, dtype)
    evaluation = evaluate_tasks(
        loaded.model,
        loaded.tokenizer,
        tasks,
        limit=limit,
        batch_size=batch_size,
        device=device,
        num_fewshot=num_fewshot,
        progress=True,
    )
    result = {
        **_describe(loaded, device, dtype),
        "batch_size": batch_size,
        "data": {t: str(p) for t, p in tasks.items()},
    }
    result.update(evaluation)
    text = markdown(evaluation, Path(checkpoint).name)
    _write(result, out, text)
    return text


def run_text(
    checkpoint: str, inputs: list[str], *, device: torch.device, dtype: torch.dtype, batch_size: int, out: str | None
) -> dict[str, Any]:
    """Perplexity and bits per byte of raw text (`text_perplexity`); writes the JSON to `out`.

    `inputs` are files, directories or globs, expanded as `llamita prepare` expands them; the paths they lead to
    that are not read are reported on stderr and in the result's ``text_skipped``.
    """
    found = expand_inputs(inputs)
    if found.skipped_total:
        print(f"llamita evaluate: {found.skipped_summary()}", file=sys.stderr)
    files = found.files
    loaded = load_model(checkpoint, device, dtype)
    result = {**_describe(loaded, device, dtype), "text_files": [str(f) for f in files]}
    if found.skipped_total:
        result["text_skipped"] = found.skipped_dict()
    result.update(text_perplexity(loaded.model, loaded.tokenizer, files, batch_size=batch_size))
    _write(result, out)
    return result


def held_out_shards(checkpoint: str, data_dirs: list[str], split: str, seq_len: int) -> tuple[list[Path], int]:
    """The `split` shards of `data_dirs` (default: the run's own sources) and their window length (default: the
    run's data.seq_len), read from the checkpoint's run config before its weights are loaded.

    Raises:
        ConfigError: a Hugging Face directory without both, a run that names no sources, or no such shards.
    """
    from llamita.config import config_from_dict
    from llamita.data.prepare import shard_paths
    from llamita.train import checkpoint as ckpt

    hf = is_hf_directory(checkpoint)
    if hf and (not data_dirs or not seq_len):
        raise ConfigError(
            f"{checkpoint} is a Hugging Face directory, which names no training data: pass --data with prepared "
            "source directories and --seq-len"
        )
    if not hf:  # the run's own sources and window, read before the weights are loaded
        run_config = config_from_dict(ckpt.read_state(ckpt.resolve_checkpoint(checkpoint))["run_config"])
        data_dirs = data_dirs or [s.path for s in run_config.data.sources]
        seq_len = seq_len or run_config.data.seq_len
        if not data_dirs:
            raise ConfigError(
                f"{checkpoint}: the run names no data sources (an imported model has none), so there is nothing to "
                "score; pass --data with prepared source directories, or --text FILES"
            )
    shards = [p for d in data_dirs for p in shard_paths(Path(d), split)]
    if not shards:
        raise ConfigError(
            f"no {split} shards in {', '.join(map(str, data_dirs))} (a source whose {split} split is empty); pass "
            f"--data with other prepared sources{', or --split train' if split == 'val' else ''}, or --text FILES"
        )
    return shards, seq_len


def run_shards(
    checkpoint: str,
    data_dirs: list[str],
    *,
    device: torch.device,
    split: str,
    seq_len: int,
    batch_size: int,
    batches: int,
    out: str | None,
) -> dict[str, Any]:
    """Validation loss on prepared shards: `data_dirs`, else the run's own sources; writes the JSON to `out`."""
    from llamita.pretrained import load_pretrained

    shards, seq_len = held_out_shards(checkpoint, data_dirs, split, seq_len)
    if is_hf_directory(checkpoint):
        loaded = load_model(checkpoint, device)
        model, source, step = loaded.model, loaded.source, None
    else:
        pre = load_pretrained(checkpoint, device)
        model, source, step = pre.model, pre.checkpoint, pre.step
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    result = validation_loss(
        model,
        shards,
        seq_len=seq_len,
        batch_size=batch_size,
        max_batches=batches or None,
        device=device,
        autocast=autocast,
        vocab_size=model.config.vocab_size,
    )
    result = {"checkpoint": str(source), "step": step, "split": split, **result}
    _write(result, out)
    return result
