"""Throughput and MFU, metrics.jsonl, TensorBoard events and W&B runs, the console progress bar and the loss plot."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from llamita.config import ConfigError, RunConfig, to_dict
from llamita.plan.gpus import GPUS

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) used for MFU; MFU is not reported on other devices.
PEAK_BF16_FLOPS = {gpu.name.split("-")[0]: gpu.peak_bf16_flops for gpu in GPUS.values()}
"""By the family part of the planner's catalogue names (H100, A100, ...), matched in `torch.cuda.get_device_name`."""


def peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of the GPU by name, or None when unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


WANDB_RUN_ID_FILE = "wandb_run_id"
"""In the run directory: the id of its W&B run, so that a resume continues that run instead of starting another."""


def import_wandb() -> ModuleType:
    """The wandb package, or a ConfigError that says how to install it."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(
            f"log.wandb: Weights & Biases logging needs the wandb package ({e}): "
            "pip install 'llamita[wandb]', or set log.wandb false"
        ) from None
    return wandb


def start_wandb(cfg: RunConfig, start_step: int) -> Any:
    """Start (or, for a run resumed at `start_step` > 0, continue) the W&B run of `cfg.out_dir`, configured by
    `cfg.log.wandb_*`, with the resolved `cfg` as its config; the W&B `Run`.

    The run's id is kept in <out_dir>/`WANDB_RUN_ID_FILE`: a fresh start (step 0) gets a new one from W&B, a resume
    continues the stored one. W&B's own files go to <out_dir>/wandb, or under $WANDB_DIR when that is set. W&B
    history cannot be cut back as metrics.jsonl and TensorBoard are: rows that a stopped run sent after its last
    checkpoint stay, and the resumed run's rows for those steps follow them (the same losses, when the resume
    changes nothing in the config, as its steps repeat the cut run's bit for bit).
    """
    wandb = import_wandb()
    log, out_dir = cfg.log, Path(cfg.out_dir)
    id_file = out_dir / WANDB_RUN_ID_FILE
    run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else None
    run = wandb.init(
        project=log.wandb_project,
        entity=log.wandb_entity or None,
        name=log.wandb_name or out_dir.resolve().name,
        id=run_id,
        resume="allow" if run_id else None,
        config=to_dict(cfg),
        dir=os.environ.get("WANDB_DIR") or out_dir,
        mode=None if log.wandb_mode == "auto" else log.wandb_mode,
    )
    # Rows are logged whole, `step` included: W&B plots them against it, and a validation row and the training row
    # of one step stay two history rows, as in metrics.jsonl, instead of merging under W&B's own step counter.
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    id_file.write_text(run.id + "\n")
    return run


class MetricsLogger:
    """Write one JSON object per logged step to metrics.jsonl, mirror scalars to TensorBoard, rows to W&B, show
    progress.

    Only rank 0 writes; other ranks get a logger that does nothing. The progress bar is drawn only on a terminal:
    elsewhere (a file, a Slurm log) and with `progress` off, `report` prints plain lines instead.

    Args:
        out_dir: the run directory.
        total_steps: the run's last step, for the progress bar.
        start_step: the step the run starts after (a resume's checkpoint step; 0 for a fresh start).
        tensorboard: write TensorBoard events to <out_dir>/tb.
        progress: draw the progress bar on a terminal.
        enabled: false on every rank but 0.
        wandb: the run's config when `log.wandb` is on: each row also goes to its W&B run (`start_wandb`);
            None: no W&B. A missing wandb package is a ConfigError on every rank, before any file is written.
    """

    def __init__(
        self,
        out_dir: Path,
        total_steps: int,
        *,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        enabled: bool = True,
        wandb: RunConfig | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        self._progress = None
        if wandb is not None:
            import_wandb()  # on every rank: a missing package stops the whole job at its start, not rank 0 alone
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step == 0 and self.path.exists():
            self.path.unlink()
        elif start_step > 0 and self.path.exists():
            # A resumed run rewrites the rows after its checkpoint so the file has each step once.
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=start_step or None)
        if wandb is not None:
            self._wandb = start_wandb(wandb, start_step)
        if progress and sys.stdout.isatty():  # redrawing a bar in a log file would fill it
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()

    def log(self, row: dict[str, Any]) -> None:
        """Record one row (must hold `step`); scalars go to TensorBoard under their key, the row as it is to W&B."""
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = row["step"]
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row)

    def report(self, row: dict[str, Any]) -> None:
        """Show a training row (as `log` takes it) on the console: in the progress bar, or as one plain line."""
        if not self.enabled:
            return
        parts = [f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}", f"grad norm {row['grad_norm']:.2f}"]
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
        if row.get("mfu") is not None:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        if row.get("skipped_steps"):
            parts.append(f"{row['skipped_steps']} skipped steps")
        if self._progress is not None:
            self._progress.update(self._task, completed=row["step"], info=" | ".join(parts))
        else:
            print(" | ".join([f"step {row['step']:>6}", *parts]), flush=True)

    def advance(self, step: int) -> None:
        """Move the progress bar without writing a row."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def print(self, message: str) -> None:
        """Print above the progress bar (rank 0 only)."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, flush=True)

    def plot(self) -> None:
        """Redraw <out_dir>/loss.png from metrics.jsonl (`plot_loss`); a failure is a warning, never an error."""
        if not self.enabled:
            return
        png = self.path.with_name("loss.png")
        try:
            plot_loss(self.path, png)
        except Exception as e:  # e.g. no matplotlib: the plot is a convenience and must not stop a training run
            warnings.warn(f"could not write the loss plot {png}: {type(e).__name__}: {e}", stacklevel=2)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            # Called from the trainer's `finally`: an exception on its way out marks the W&B run failed.
            self._wandb.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
        self._file.close()


class Throughput:
    """Tokens/s over the interval since the last call, and MFU from FLOPs/token and the device peak."""

    def __init__(self, flops_per_token: float, peak: float | None) -> None:
        self.flops_per_token = flops_per_token
        self.peak = peak
        self._t = time.perf_counter()
        self._tokens = 0

    def update(self, tokens: int) -> tuple[float, float | None]:
        now = time.perf_counter()
        rate = (tokens - self._tokens) / max(now - self._t, 1e-9)
        self._t, self._tokens = now, tokens
        mfu = rate * self.flops_per_token / self.peak if self.peak else None
        return rate, mfu


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out_png: Path) -> Path:
    """Plot training loss (and validation loss when present) against tokens seen to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
