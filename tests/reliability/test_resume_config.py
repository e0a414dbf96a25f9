"""Resume refuses config changes that change the run's math unless checkpoint.allow_config_change is set; every
change is recorded in config_changes.jsonl and config.yaml stays the first start's."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

import llamita.pretrain
from llamita.pretrain import pretrain
from llamita.train import checkpoint as ckpt
from llamita.train.trainer import CONFIG_CHANGES_FILE
from pretrain_runs import train_rows

SETTINGS = {
    "train.max_steps": "6",
    "train.threads": "1",
    "eval.interval": "0",
    "checkpoint.interval": "2",
    "checkpoint.keep_last": "0",
}


@pytest.fixture
def cut_run(debug_config, tmp_path):
    """A 6-step run cut after its step-4 checkpoint (as a preemption would leave it); returns its directory."""
    run = tmp_path / "run"
    pretrain(debug_config(run, **SETTINGS))
    shutil.rmtree(ckpt.checkpoint_path(run, 6))
    return run


def _config_yaml(run) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def test_changes_to_the_math_are_refused_before_any_expensive_work(cut_run, debug_config, monkeypatch):
    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the config check comes before loading tokenizer, data and model")

    monkeypatch.setattr(llamita.pretrain.Tokenizer, "load", no_tokenizer)
    changed = {"train.max_steps": "9", "optim.lr": "5e-3", "data.seq_len": "32", "log.interval": "3"}
    with pytest.raises(ckpt.CheckpointError, match="allow_config_change") as info:
        pretrain(debug_config(cut_run, **{**SETTINGS, **changed}))
    message = str(info.value)
    for line in ("train.max_steps: 6 -> 9", "optim.lr: 0.001 -> 0.005", "data.seq_len: 64 -> 32"):
        assert f"\n  {line}" in message
    assert "log.interval" not in message  # free to change
    assert _config_yaml(cut_run)["optim"]["lr"] == 1e-3
    assert not (cut_run / CONFIG_CHANGES_FILE).exists()


def test_free_changes_resume_exactly_and_are_recorded(cut_run, debug_config, tmp_path):
    straight = train_rows(cut_run)
    free = {"log.interval": "3", "eval.interval": "5", "checkpoint.keep_last": "2", "train.micro_batch": "2"}
    assert pretrain(debug_config(cut_run, **{**SETTINGS, **free}))["step"] == 6
    resumed = train_rows(cut_run)
    assert [r[0] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r[3] for r in resumed] == [r[3] for r in straight]  # the same schedule
    # 4 micro-batches of 2 instead of 2 of 4: the same global batch, summed in another order.
    assert [v for r in resumed[4:] for v in r] == pytest.approx([v for r in straight[4:] for v in r], rel=1e-4)
    assert _config_yaml(cut_run)["log"]["interval"] == 1  # the first start's
    (row,) = [json.loads(line) for line in (cut_run / CONFIG_CHANGES_FILE).read_text().splitlines()]
    assert row["step"] == 4 and row["checkpoint"] == str(ckpt.checkpoint_path(cut_run, 4))
    assert row["changes"]["log.interval"] == {"checkpoint": 1, "new": 3}
    assert set(row["changes"]) == set(free) and row["config"]["log"]["interval"] == 3


def test_an_allowed_change_is_logged_and_recorded(cut_run, debug_config, capsys):
    changed = {"train.max_steps": "8", "optim.lr": "5e-3", "checkpoint.allow_config_change": "true"}
    assert pretrain(debug_config(cut_run, **{**SETTINGS, **changed}))["step"] == 8
    out = capsys.readouterr().out
    assert "train.max_steps: 6 -> 8 (changes the run's math)" in out and "optim.lr: 0.001 -> 0.005" in out
    assert _config_yaml(cut_run)["train"]["max_steps"] == 6 and _config_yaml(cut_run)["optim"]["lr"] == 1e-3
    (row,) = [json.loads(line) for line in (cut_run / CONFIG_CHANGES_FILE).read_text().splitlines()]
    assert row["step"] == 4 and row["changes"]["optim.lr"] == {"checkpoint": 1e-3, "new": 5e-3}
    assert row["changes"]["checkpoint.allow_config_change"] == {"checkpoint": False, "new": True}
    assert row["config"]["train"]["max_steps"] == 8
    assert [r[0] for r in train_rows(cut_run)] == list(range(1, 9))


def test_where_the_run_starts_is_no_change(cut_run, debug_config):
    """checkpoint.resume naming the checkpoint and init.from (which a resume outranks) are not compared."""
    where = {"checkpoint.resume": str(ckpt.checkpoint_path(cut_run, 4)), "init.from": str(cut_run)}
    assert pretrain(debug_config(cut_run, **SETTINGS, **where))["step"] == 6
    assert not (cut_run / CONFIG_CHANGES_FILE).exists()
