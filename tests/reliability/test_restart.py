"""A rank killed under `torchrun --max-restarts`: the job restarts from the last checkpoint and ends as if never killed.

The kill comes from a driver script that wraps `Trainer.train_step` (nothing test-only lives in `src/`): rank 1
SIGKILLs itself as it starts step `KILL_AT + 1`, only on torchrun's first attempt (`TORCHELASTIC_RESTART_COUNT`).
"""

from __future__ import annotations

import textwrap

from llamita.train import checkpoint as ckpt
from pretrain_runs import finish, losses, torchrun

STEPS = 12
KILL_AT = 6  # steps 5 and 6 are done and logged when rank 1 dies; the last checkpoint is step 4's
SETTINGS = {
    "train.max_steps": str(STEPS),
    "train.threads": "1",
    "eval.interval": "0",
    "checkpoint.interval": "4",
    "checkpoint.keep_last": "0",
}

KILL_RANK_1_DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from llamita.config import load_config
    from llamita.pretrain import pretrain
    from llamita.train.trainer import Trainer

    kill_at = int(os.environ["KILL_AT_STEP"])
    train_step = Trainer.train_step

    def train_step_or_die(self):
        if self.rank == 1 and self.state.step == kill_at and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            (Path(self.cfg.out_dir) / "KILLED").write_text(str(kill_at))
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self)

    Trainer.train_step = train_step_or_die
    pretrain(load_config(sys.argv[1]))
    """
)


def test_killed_rank_restarts_from_last_checkpoint(debug_config, tmp_path):
    straight = tmp_path / "straight"
    finish(torchrun(debug_config(straight, **SETTINGS)))

    run = tmp_path / "run"
    driver = tmp_path / "kill_rank_1.py"
    driver.write_text(KILL_RANK_1_DRIVER)
    # torchrun's default shared rendezvous store keeps the previous attempt's keys, so a restarted worker can read
    # its peer's old address and fail to connect (pytorch/pytorch#135712); a fresh store per attempt avoids it.
    env = {"KILL_AT_STEP": str(KILL_AT), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    job = torchrun(debug_config(run, **SETTINGS), "--max-restarts=2", script=driver, env=env)
    out = finish(job)
    assert (run / "KILLED").read_text() == str(KILL_AT), "rank 1 was never killed"
    assert f"resumed from {ckpt.checkpoint_path(run, 4)} at step 4" in out, out[-6000:]
    assert [p.name for p in ckpt.list_checkpoints(run)] == [f"step_{s:08d}" for s in (4, 8, 12)]
    assert losses(run) == losses(straight)
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1))
