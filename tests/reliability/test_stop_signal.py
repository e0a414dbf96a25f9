"""SIGTERM to one of 2 gloo ranks: every rank saves at the next step boundary and exits 0; the resume is exact."""

from __future__ import annotations

import os
import signal
import time

from checkpoint_compare import assert_same_checkpoint
from llamita.train import checkpoint as ckpt
from pretrain_runs import finish, losses, torchrun, train_rows, worker_pid

STEPS = 40
SETTINGS = {
    "train.max_steps": str(STEPS),
    "train.threads": "1",
    "eval.interval": "0",
    "checkpoint.interval": "0",
    "checkpoint.keep_last": "0",
}


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
    assert train_rows(run) == train_rows(straight)  # per-step loss, grad norm and lr
    # The final 2-rank FSDP checkpoints: model, optimizer, both ranks' RNG and the loader state, bit for bit.
    assert_same_checkpoint(ckpt.checkpoint_path(straight, STEPS), ckpt.checkpoint_path(run, STEPS))
