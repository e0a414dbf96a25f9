"""Batch-size stages in a run: accumulation changes at the right step, the LR follows the tokens, resume is exact."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import shutil

import pytest

from checkpoint_compare import assert_same_checkpoint
from llamita.config import ConfigError
from llamita.pretrain import global_batch_sequences, pretrain
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics

# The debug recipe: 64-token sequences, micro-batches of 4, so 512 tokens are 2 micro-batches and 1024 are 4.
STAGED = {
    "train.global_batch_tokens": "512",
    "train.batch_stages": "[{from_tokens: 2560, global_batch_tokens: 1024}]",
    "train.max_steps": "0",
    "train.max_tokens": str(5 * 512 + 5 * 1024 + 1000),  # 5 steps of 512, 5 of 1024; the last 1000 fit no step
    "checkpoint.interval": "2",
    "checkpoint.keep_last": "0",
    "eval.interval": "0",
}


def _rows(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _cosine(position: float, lr: float, min_lr: float, warmup: int, span: float) -> float:
    """Warmup + cosine at a position in steps of the first batch, in float64 (Python floats)."""
    if position < warmup:
        return lr * (position + 1) / warmup
    x = min(1.0, (position - warmup) / (span - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * x))


@pytest.fixture(scope="module")
def staged_run(debug_config, tmp_path_factory):
    """An uninterrupted 10-step run whose batch doubles after 5 steps: its directory, config, console output and
    summary."""
    run = tmp_path_factory.mktemp("staged") / "run"
    cfg = debug_config(run, **STAGED)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = pretrain(cfg)
    return run, cfg, out.getvalue(), result


def test_accumulation_changes_at_the_stage_and_the_lr_follows_tokens(staged_run):
    run, _, out, result = staged_run
    assert result["step"] == 10  # derived from train.max_tokens with the schedule
    assert "512 tokens/step = 4 seq x 2 accum x 1 ranks x 64 tokens" in out
    assert "step      6 | tokens 2,560 | global batch 512 -> 1,024 tokens | accumulation 2 -> 4" in out
    assert out.count("global batch 512 -> 1,024") == 1
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["batch_tokens"] for r in rows] == [512] * 5 + [1024] * 5
    assert [r["tokens"] for r in rows] == [512 * k for k in range(1, 6)] + [2560 + 1024 * k for k in range(1, 6)]
    # The LR is a function of tokens seen: step 7 starts after 3584 tokens, position 7 of the 512-token unit, over
    # the run's 7680 tokens = 15 units (debug recipe: lr 1e-3 -> 1e-4, 5 warmup steps).
    for r in rows:
        before = r["tokens"] - r["batch_tokens"]
        assert r["lr"] == pytest.approx(_cosine(before / 512, 1e-3, 1e-4, 5, 15.0), rel=1e-12)


@pytest.mark.parametrize("resume_step", [4, 6], ids=["before-the-change", "after-the-change"])
def test_resume_across_the_change_equals_the_uninterrupted_run(staged_run, tmp_path, resume_step):
    """Cut the run after step 4 (it resumes into the change) or step 6 (past it): losses, grad norms, LRs and
    the final checkpoint (weights, optimizer moments, RNG, loader state) are bit for bit the uninterrupted run's."""
    run, cfg, _, _ = staged_run
    straight = _rows(run)
    cut = tmp_path / "run"
    shutil.copytree(run, cut)
    for path in ckpt.list_checkpoints(cut):
        if int(path.name.removeprefix(ckpt.PREFIX)) > resume_step:
            shutil.rmtree(path)
    assert pretrain(dataclasses.replace(cfg, out_dir=str(cut)))["step"] == 10
    resumed = _rows(cut)
    assert [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens"]) for r in resumed] == [
        (r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens"]) for r in straight
    ]
    assert_same_checkpoint(ckpt.checkpoint_path(run, 10), ckpt.checkpoint_path(cut, 10))


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ("[{from_tokens: 1024}]", r"train.batch_stages\[0\]: expected a mapping with exactly the keys"),
        ("[{from_tokens: 0, global_batch_tokens: 1024}]", r"train.batch_stages\[0\].from_tokens: must be an integer"),
        ("[{from_tokens: 10.5, global_batch_tokens: 1024}]", r"train.batch_stages\[0\].from_tokens: must be an intege"),
        (
            "[{from_tokens: 9, global_batch_tokens: 1024}, {from_tokens: 9, global_batch_tokens: 512}]",
            r"\[1\].from_tok",
        ),
    ],
)
def test_malformed_batch_stages_are_refused_naming_the_entry(debug_config, tmp_path, stages, match):
    with pytest.raises(ConfigError, match=match):
        debug_config(tmp_path, **{"train.batch_stages": stages})


def test_every_batch_must_split_into_micro_batches(debug_config, tmp_path):
    cfg = debug_config(tmp_path, **{"train.batch_stages": "[{from_tokens: 512, global_batch_tokens: 640}]"})
    with pytest.raises(
        ConfigError, match=r"train.batch_stages\[0\].global_batch_tokens=640 is not a multiple of .* 256"
    ):
        global_batch_sequences(cfg, world_size=1)
