"""SIGTERM to one of 2 gloo ranks: every rank saves at the next step boundary and exits 0; the resume is exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llamita.config import RunConfig, save_config
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics

STEPS = 40
SETTINGS = {
    "train.max_steps": str(STEPS),
    "train.threads": "1",
    "eval.interval": "0",
    "checkpoint.interval": "0",
    "checkpoint.keep_last": "0",
}


def torchrun(cfg: RunConfig) -> subprocess.Popen:
    recipe = Path(cfg.out_dir).with_suffix(".yaml")
    save_config(cfg, recipe)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "llamita.cli", "pretrain", "--config", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-6000:]
    return out


def losses(run: Path) -> list[tuple[int, float]]:
    if not (run / "metrics.jsonl").is_file():
        return []
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


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


def test_sigterm_on_one_rank_checkpoints_all_and_resume_is_exact(debug_config, tmp_path):
    straight = tmp_path / "straight"
    finish(torchrun(debug_config(straight, **SETTINGS)))

    run = tmp_path / "run"
    cfg = debug_config(run, **SETTINGS)
    proc = torchrun(cfg)
    deadline = time.monotonic() + 240
    while len(losses(run)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = worker_pid(proc.pid, rank=1)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, signal.SIGTERM)  # rank 0 gets no signal: the ranks agree through the step-boundary all_reduce
    out = finish(proc)
    assert "stopped by a signal on another rank" in out

    saved = ckpt.list_checkpoints(run)
    assert len(saved) == 1
    stopped_at = ckpt.read_state(saved[0])["step"]
    assert 2 <= stopped_at < STEPS, "the signal came too late to test a stop"
    assert [s for s, _ in losses(run)] == list(range(1, stopped_at + 1))

    finish(torchrun(cfg))  # checkpoint.resume=auto
    assert losses(run) == losses(straight)
