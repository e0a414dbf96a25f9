"""Branching (`init.branch_from`): a new run that continues another run's weights, optimizer and schedule with a
new data mixture, in its own directory, leaving the parent's untouched."""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
from pathlib import Path

import pytest
import yaml

from checkpoint_compare import assert_same, checkpoint_contents
from llamita.config import ConfigError
from llamita.pretrain import pretrain
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics
from pretrain_runs import mixture_sources

# A 20-step schedule (5 warmup steps, cosine over 20 x 512 tokens); the parent stops half-way.
SCHEDULE = {"optim.schedule_tokens": str(20 * 512), "eval.interval": "0", "checkpoint.keep_last": "0"}


def _sources(prepared, prose: float, code: float) -> str:
    return mixture_sources(prepared["prose"], prepared["code"], (prose, code))


def _rows(run: Path) -> list[tuple]:
    return [
        (r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens"])
        for r in read_metrics(run / "metrics.jsonl")
        if "loss" in r
    ]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _weights_and_optimizer(run: Path, step: int) -> dict:
    contents = checkpoint_contents(ckpt.checkpoint_path(run, step))
    return {"dcp": contents["dcp"], "rng": contents["rng"]}


@pytest.fixture(scope="module")
def parent(debug_config, tmp_path_factory) -> Path:
    """10 steps of a 20-step schedule, prose:code 7:3, a checkpoint at step 10."""
    run = tmp_path_factory.mktemp("parent") / "run"
    pretrain(debug_config(run, **SCHEDULE, **{"train.max_steps": "10", "checkpoint.interval": "10"}))
    return run


def _branch(debug_config, prepared, parent: Path, out: Path, prose: float, code: float, **more: str):
    values = {**SCHEDULE, "train.max_steps": "20", "checkpoint.interval": "2", "init.branch_from": str(parent)}
    return debug_config(out, **{**values, "data.sources": _sources(prepared, prose, code), **more})


def test_a_branch_continues_as_the_parent_resumed_with_the_new_mixture(debug_config, prepared, parent, tmp_path):
    """The branch's steps 11-20 (loss, grad norm, LR) and its final weights, optimizer moments and RNG equal the
    parent's own run resumed with the new mixture (checkpoint.allow_config_change), bit for bit."""
    reference = tmp_path / "reference"
    shutil.copytree(parent, reference)
    resumed = debug_config(
        reference,
        **SCHEDULE,
        **{"train.max_steps": "20", "checkpoint.interval": "10", "checkpoint.allow_config_change": "true"},
        **{"data.sources": _sources(prepared, 0.2, 0.8)},
    )
    pretrain(resumed)

    branch = tmp_path / "branch"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = pretrain(_branch(debug_config, prepared, parent, branch, 0.2, 0.8))
    assert result["step"] == 20
    parent_ckpt = ckpt.checkpoint_path(parent, 10)
    assert f"branched from {parent_ckpt} at step 10 (5,120 tokens)" in out.getvalue()
    assert "data.sources[0].weight: 0.7 -> 0.2" in out.getvalue()
    assert _rows(branch) == [r for r in _rows(reference) if r[0] > 10]
    assert_same(_weights_and_optimizer(branch, 20), _weights_and_optimizer(reference, 20))

    # Where it came from: config.yaml, the first metrics row and every checkpoint of the branch.
    assert yaml.safe_load((branch / "config.yaml").read_text())["init"]["branch_from"] == str(parent_ckpt)
    first = read_metrics(branch / "metrics.jsonl")[0]
    assert first == {"step": 10, "tokens": 5120, "branched_from": str(parent_ckpt)}
    record = ckpt.read_state(ckpt.checkpoint_path(branch, 20))["branched_from"]
    assert (record["checkpoint"], record["step"], record["tokens"]) == (str(parent_ckpt), 10, 5120)
    assert record["changes"]["data.sources[0].weight"] == {"parent": 0.7, "new": 0.2}


def test_branches_from_one_checkpoint_are_independent(debug_config, prepared, parent, tmp_path):
    """Two branches of one checkpoint leave the parent's directory as it was and do not change each other; the
    same command run again after the branch saved checkpoints resumes the branch instead of branching again."""
    before = _tree_digest(parent)
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain(_branch(debug_config, prepared, parent, a, 0.2, 0.8))
    pretrain(_branch(debug_config, prepared, parent, b, 0.9, 0.1, **{"train.max_steps": "16"}))
    assert _tree_digest(parent) == before
    assert _rows(a)[0][1] != _rows(b)[0][1]  # other data, another first loss

    again = tmp_path / "a-again"
    cfg = _branch(debug_config, prepared, parent, again, 0.2, 0.8)
    for path in ckpt.list_checkpoints(a):  # the first branch, interrupted after its step 14
        if int(path.name.removeprefix(ckpt.PREFIX)) <= 14:
            shutil.copytree(path, again / "checkpoints" / path.name)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        pretrain(cfg)
    assert f"resumed from {ckpt.checkpoint_path(again, 14)} at step 14" in out.getvalue()
    assert "branched from" not in out.getvalue()
    assert _rows(again) == [r for r in _rows(a) if r[0] > 14]
    assert_same(_weights_and_optimizer(again, 20), _weights_and_optimizer(a, 20))
    assert ckpt.read_state(ckpt.checkpoint_path(again, 20))["branched_from"]["step"] == 10
    assert _tree_digest(parent) == before


def test_a_branch_needs_the_parents_model_and_its_own_directory(debug_config, prepared, parent, tmp_path):
    cfg = _branch(debug_config, prepared, parent, tmp_path / "wide", 0.5, 0.5, **{"model.tie_embeddings": "true"})
    with pytest.raises(
        ckpt.CheckpointError, match=r"another model than this run's \(tie_embeddings: False \(parent\) != True"
    ):
        pretrain(cfg)
    with pytest.raises(ConfigError, match="in this run's own out_dir"):
        _branch(debug_config, prepared, parent, parent, 0.5, 0.5)
    with pytest.raises(ConfigError, match="init.from and init.branch_from are both set"):
        debug_config(tmp_path / "both", **{"init.branch_from": str(parent), "init.from": str(parent)})
