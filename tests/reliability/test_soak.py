"""Soak: a few hundred steps of the `debug` model, SIGKILLed at random steps and resumed each time, end bit-identical.

Each attempt runs `llamita pretrain` in a subprocess and is killed (SIGKILL, no warning) once it has logged the step
drawn for it, wherever it is then: in a step, writing metrics, saving or pruning a checkpoint. The next attempt
resumes automatically from the latest complete checkpoint. The steps come from a seeded generator, so a failure
reproduces.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llamita.config import save_config
from llamita.pretrain import pretrain
from llamita.pretrained import load_pretrained
from pretrain_runs import train_rows

STEPS = 300
KILLS = 6
SEED = 20261124
SETTINGS = {
    "train.max_steps": str(STEPS),
    "train.threads": "1",
    "data.seq_len": "16",
    "train.global_batch_tokens": "64",
    "train.micro_batch": "4",
    "eval.interval": "0",
    "checkpoint.interval": "5",
    "checkpoint.keep_last": "2",
}


def last_logged_step(run: Path) -> int:
    """The step of the last complete training row in metrics.jsonl (0 if none); the file is being written."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    lines = text.splitlines()[: text.count("\n")]  # a line still being written has no newline yet
    steps = [row["step"] for row in map(json.loads, lines) if "loss" in row]
    return steps[-1] if steps else 0


def kill_after(recipe: Path, run: Path, step: int) -> int:
    """Start `llamita pretrain` on `recipe`, SIGKILL it once `run` has a metrics row for `step` or later.

    Returns:
        The last step logged when the kill was sent.
    """
    cmd = [sys.executable, "-m", "llamita.cli", "pretrain", "--config", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            last = last_logged_step(run)
            if last >= step:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                return last
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"the run never reached step {step} (exit code {proc.returncode}):\n{err[-4000:]}")


@pytest.mark.slow
def test_random_kills_and_auto_resume_end_like_an_uninterrupted_run(debug_config, tmp_path):
    straight = tmp_path / "straight"
    pretrain(debug_config(straight, **SETTINGS))

    run = tmp_path / "run"
    cfg = debug_config(run, **SETTINGS)
    recipe = tmp_path / "run.yaml"
    save_config(cfg, recipe)
    rng = random.Random(SEED)
    killed_at = [0]
    for _ in range(KILLS):
        # A step past the last kill: rows up to it are still in metrics.jsonl until the next attempt rewrites them.
        target = min(killed_at[-1] + rng.randint(4, 60), STEPS - 10)
        killed_at.append(kill_after(recipe, run, target))
    assert killed_at[-1] < STEPS, "the last kill came after the run had finished"

    assert pretrain(cfg)["step"] == STEPS  # the last attempt runs to the end
    assert [row[0] for row in train_rows(run)] == list(range(1, STEPS + 1))
    assert train_rows(run) == train_rows(straight), f"killed after steps {killed_at[1:]}"
    resumed, expected = load_pretrained(run).model.state_dict(), load_pretrained(straight).model.state_dict()
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
