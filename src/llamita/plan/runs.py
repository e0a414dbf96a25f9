"""Scaling-law data points from your own runs: (parameters, training tokens, validation loss) per run directory.

`llamita plan fit RUNS...` fits a law to these; each run contributes the validation loss it reached at its last
validation, with the tokens seen by then, so runs of different lengths (each with its own cosine schedule, as
Hoffmann et al. trained theirs) are points of one fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llamita.model.config import ModelConfig
from llamita.plan.errors import PlanError
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics


@dataclass(frozen=True)
class RunPoint:
    run: str
    """The run directory."""
    n_params: int
    """The model's parameters (a tied output head counted once)."""
    n_tokens: int
    """Training tokens seen at the run's last validation."""
    loss: float
    """Validation loss there (nats per token)."""
    step: int
    """The step of that validation."""


def read_run_point(run: str | Path) -> RunPoint:
    """The last validation of a `llamita pretrain` run directory and its model's size.

    Raises:
        PlanError: not a run directory, no checkpoint, or a metrics.jsonl without a validation row.
    """
    run = Path(run)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise PlanError(f"{run}: no metrics.jsonl; give the run directories of `llamita pretrain` runs")
    try:
        state = ckpt.read_state(ckpt.resolve_checkpoint(run))
    except ckpt.CheckpointError as e:
        raise PlanError(f"{run}: {e}") from None
    config = ModelConfig(**state["model_config"])
    rows = [r for r in read_metrics(metrics) if "val_loss" in r]
    if not rows:
        raise PlanError(f"{metrics}: no validation loss recorded (the run had no validation shards?)")
    last = rows[-1]
    return RunPoint(str(run), config.num_params, int(last["tokens"]), float(last["val_loss"]), int(last["step"]))


def read_run_points(runs: list[str | Path]) -> list[RunPoint]:
    """`read_run_point` of each run, in the order given."""
    return [read_run_point(r) for r in runs]
