"""SIGTERM to one of 2 gloo ranks: every rank saves at the next step boundary and exits 0; the resume is exact.
SIGINT in one process: the summary reports the latest loss and validation, each with its step."""

from __future__ import annotations

import os
import signal
import time

from checkpoint_compare import assert_same_checkpoint
from llamita.pretrain import pretrain
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics
from llamita.train.trainer import Trainer
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


def test_sigint_summary_pairs_the_latest_values_with_their_steps(debug_config, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    cfg = debug_config(run, **{**SETTINGS, "eval.interval": "10", "log.interval": "5"})
    train_step = Trainer.train_step

    def interrupted_at_27(self):
        out = train_step(self)
        if self.state.step == 27:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        return out

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_27)
    result = pretrain(cfg)
    rows = read_metrics(run / "metrics.jsonl")
    last_train = [r for r in rows if "loss" in r][-1]
    last_val = [r for r in rows if "val_loss" in r][-1]
    assert result["stopped"] and 27 < result["step"] < 30  # the host learns of the stop a step or two late
    assert ckpt.read_state(ckpt.list_checkpoints(run)[-1])["step"] == result["step"]
    assert [result[k] for k in ("step", "loss", "tokens")] == [last_train[k] for k in ("step", "loss", "tokens")]
    assert (result["val_step"], result["val_loss"]) == (20, last_val["val_loss"]) and last_val["step"] == 20
    out = capsys.readouterr().out
    assert f"step {result['step']:>6} | loss {result['loss']:.4f} | lr " in out  # the stop step is shown too
    assert "stopped by SIGINT" in out
