"""`llamita pretrain` runs for the tests: a 2-rank torchrun job on CPU, and a run's per-step rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llamita.config import RunConfig, save_config
from llamita.train.metrics import read_metrics


def mixture_sources(prose: Path, code: Path, weights: tuple[float, float] = (0.7, 0.3)) -> str:
    """The `data.sources` override for a prose and a code source, mixed 7:3 unless `weights` say otherwise."""
    return (
        f"[{{name: prose, path: '{prose}', weight: {weights[0]}}}, "
        f"{{name: code, path: '{code}', weight: {weights[1]}}}]"
    )


def torchrun(
    cfg: RunConfig, *torchrun_args: str, script: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `cfg` on 2 processes under torchrun: `llamita pretrain --config`, or `python script recipe.yaml`.

    Args:
        cfg: the run; saved as a recipe beside its run directory.
        torchrun_args: more torchrun options (``--max-restarts=2``).
        script: a driver script to run instead of the CLI; it gets the recipe path as its argument.
        env: extra environment variables for the workers.
    """
    recipe = Path(cfg.out_dir).with_suffix(".yaml")
    save_config(cfg, recipe)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *torchrun_args]
    cmd += [str(script), str(recipe)] if script else ["-m", "llamita.cli", "pretrain", "--config", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen, ok: bool = True) -> str:
    """Wait for a torchrun job; its output. Asserts it exited 0 (or, with ``ok=False``, that it failed)."""
    out, _ = proc.communicate(timeout=300)
    assert (proc.returncode == 0) == ok, f"exit code {proc.returncode}:\n{out[-6000:]}"
    return out


def train_rows(run: Path) -> list[tuple[int, float, float, float]]:
    """(step, loss, grad norm, lr) of every training row of a run's metrics.jsonl (none before the file exists)."""
    if not (run / "metrics.jsonl").is_file():
        return []
    rows = read_metrics(run / "metrics.jsonl")
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows if "loss" in r]


def losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training row of a run's metrics.jsonl."""
    return [(step, loss) for step, loss, *_ in train_rows(run)]


def worker_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process with RANK=`rank`, from /proc."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except (OSError, ValueError):
            continue
        if env.get(b"RANK") == str(rank).encode():
            return int(proc.name)
    return None
