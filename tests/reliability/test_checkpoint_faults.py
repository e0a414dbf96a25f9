"""Fault injection around checkpoints: damaged files, a full disk, a failed delete, a kill -9 during a save."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from llamita.config import save_config
from llamita.pretrain import pretrain
from llamita.pretrained import load_pretrained
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics

FAST = {"train.threads": "1", "eval.interval": "0", "checkpoint.interval": "2", "checkpoint.keep_last": "0"}


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def saved_run(debug_config, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("faults") / "run"
    pretrain(debug_config(run, **FAST, **{"train.max_steps": "4"}))
    return run


def test_checksums_cover_every_file(saved_run):
    for folder in ckpt.list_checkpoints(saved_run):
        sums = json.loads((folder / ckpt.CHECKSUMS_FILE).read_text())
        assert sorted(sums) == sorted(p.name for p in folder.iterdir() if p.name != ckpt.CHECKSUMS_FILE)
        assert {".metadata", ckpt.STATE_FILE, "rng_rank0.pt"} <= sums.keys()
        ckpt.verify_checksums(folder)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_checkpoint_fails_naming_the_file(saved_run, debug_config, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    victim = next(ckpt.checkpoint_path(run, 4).glob("*.distcp"))
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
    else:
        victim.unlink()
    match = "sha256 differs" if damage != "delete" else "missing from the checkpoint"
    with pytest.raises(ckpt.CheckpointError, match=match) as info:
        load_pretrained(run)
    assert victim.name in str(info.value)
    with pytest.raises(ckpt.CheckpointError, match=victim.name):  # resume refuses it too
        pretrain(debug_config(run, **FAST, **{"train.max_steps": "4"}))


def test_disk_full_during_save_keeps_previous_checkpoint(debug_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(debug_config(run, **FAST, **{"train.max_steps": "4"}))
    shutil.rmtree(ckpt.checkpoint_path(run, 4))  # the run was cut after step 2

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp_filesystem, "_write_item", disk_full)
    with pytest.raises(ckpt.CheckpointError, match="no space left on device") as info:
        pretrain(debug_config(run, **FAST, **{"train.max_steps": "4"}))
    assert "step_00000004.tmp" in str(info.value) and "intact" in str(info.value)
    monkeypatch.undo()
    assert not ckpt.checkpoint_path(run, 4).with_name("step_00000004.tmp").exists()  # the space is given back
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002"]
    assert load_pretrained(run).step == 2  # checksums verified on load
    assert pretrain(debug_config(run, **FAST, **{"train.max_steps": "4"}))["step"] == 4  # and it resumes


def test_failed_delete_of_old_checkpoint_does_not_stop_training(debug_config, tmp_path, monkeypatch):
    real_rmtree = shutil.rmtree

    def rmtree(path, ignore_errors=False, **kwargs):
        if ignore_errors:  # clearing a stale .tmp folder
            return real_rmtree(path, ignore_errors=True, **kwargs)
        raise PermissionError(errno.EACCES, "permission denied (injected)", str(path))

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="could not delete old checkpoint"):
        result = pretrain(debug_config(run, **{**FAST, "train.max_steps": "6", "checkpoint.keep_last": "1"}))
    assert result["step"] == 6
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002", "step_00000004", "step_00000006"]


# Trains in a subprocess whose save of the step-4 checkpoint stops after the DCP files, before checksums.json.
SLOW_SAVE_DRIVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from llamita.config import load_config
    from llamita.pretrain import pretrain
    from llamita.train import checkpoint as ckpt

    write_checksums = ckpt.write_checksums

    def slow(folder):
        if Path(folder).name == "step_00000004.tmp":
            (Path(folder).parent / "SAVING").write_text("now")
            time.sleep(300)
        write_checksums(folder)

    ckpt.write_checksums = slow
    pretrain(load_config(sys.argv[1]))
    """
)


def test_kill_during_save_resumes_from_last_complete_checkpoint(debug_config, tmp_path):
    settings = {**FAST, "train.max_steps": "6"}
    straight = tmp_path / "straight"
    pretrain(debug_config(straight, **settings))

    run = tmp_path / "run"
    cfg = debug_config(run, **settings)
    recipe = tmp_path / "run.yaml"
    save_config(cfg, recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE_DRIVER, str(recipe)], env=env)
    marker = run / "checkpoints" / "SAVING"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the run never reached its step-4 save"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    marker.unlink()

    partial = run / "checkpoints" / "step_00000004.tmp"
    assert partial.is_dir() and (partial / ".metadata").is_file()  # DCP files written, never renamed
    assert ckpt.resolve_checkpoint(run).name == "step_00000002"
    result = pretrain(cfg)  # checkpoint.resume=auto
    assert result["step"] == 6
    assert not partial.exists()
    assert losses(run) == losses(straight)
