"""The training loop: exact resume, metrics rows, checkpoints, batch-size arithmetic."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from checkpoint_compare import assert_same_checkpoint
from llamita.config import ConfigError
from llamita.pretrain import global_batch_sequences, pretrain
from llamita.pretrained import load_pretrained
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics


def _state(run: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_pretrained(run).model.state_dict().items()}


def test_resume_equals_uninterrupted_run(debug_config, tmp_path):
    """40 steps straight vs the same run cut at step 20 and resumed: per-step losses and weights are equal."""
    run = tmp_path / "run"
    cfg = debug_config(run, **{"train.max_steps": "40", "checkpoint.interval": "20", "checkpoint.keep_last": "0"})
    pretrain(cfg)
    straight = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in straight] == list(range(1, 41))
    final_straight = _state(run)
    copy = tmp_path / "straight_step_40"
    shutil.copytree(ckpt.checkpoint_path(run, 40), copy)

    # Interrupt: forget everything after step 20, then resume automatically from the step-20 checkpoint.
    shutil.rmtree(ckpt.checkpoint_path(run, 40))
    resumed_result = pretrain(cfg)
    assert resumed_result["step"] == 40
    resumed = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, 41))
    for a, b in zip(straight, resumed):
        assert a["loss"] == b["loss"], (a, b)
        assert a["grad_norm"] == b["grad_norm"], (a, b)
        assert a["lr"] == b["lr"]
    final_resumed = _state(run)
    assert final_straight.keys() == final_resumed.keys()
    for k in final_straight:
        assert torch.equal(final_straight[k], final_resumed[k]), k
    # Model, optimizer moments and step counts, RNG and loader state: all bit for bit.
    assert_same_checkpoint(copy, ckpt.checkpoint_path(run, 40))


def test_metrics_checkpoints_and_pruning(debug_config, tmp_path):
    run = tmp_path / "run"
    cfg = debug_config(
        run,
        **{
            "train.max_steps": "12",
            "checkpoint.interval": "4",
            "checkpoint.keep_last": "2",
            "eval.interval": "6",
            "log.tensorboard": "true",
            "log.interval": "5",
        },
    )
    result = pretrain(cfg)
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))  # one row per step even when logging every 5
    for r in train_rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= r.keys()
        assert r["tokens"] == r["step"] * cfg.train.global_batch_tokens
    val_steps = [r["step"] for r in rows if "val_loss" in r]
    assert val_steps == [0, 6, 12]
    assert result["val_loss"] < [r["val_loss"] for r in rows if "val_loss" in r][0]
    kept = [p.name for p in ckpt.list_checkpoints(run)]
    assert kept == ["step_00000008", "step_00000012"]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    state = ckpt.read_state(ckpt.resolve_checkpoint(run))
    assert state["step"] == 12 and state["run_config"]["out_dir"] == str(run)
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()


def test_partial_checkpoint_is_ignored(debug_config, tmp_path):
    run = tmp_path / "run"
    cfg = debug_config(run, **{"train.max_steps": "4", "checkpoint.interval": "2"})
    pretrain(cfg)
    partial = run / "checkpoints" / "step_00000006.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    assert ckpt.resolve_checkpoint(run).name == "step_00000004"
    with pytest.raises(ckpt.CheckpointError, match="interrupted save"):
        ckpt.resolve_checkpoint(partial)
    with pytest.raises(ckpt.CheckpointError, match="no such"):
        ckpt.resolve_checkpoint(run / "missing")


def test_batch_arithmetic_is_checked(debug_config, tmp_path):
    cfg = debug_config(tmp_path, **{"train.global_batch_tokens": "500"})
    with pytest.raises(ConfigError, match="global_batch_tokens=500"):
        global_batch_sequences(cfg, world_size=1)
    cfg = debug_config(tmp_path, **{"train.global_batch_tokens": "1024", "train.micro_batch": "4"})
    assert global_batch_sequences(cfg, world_size=2) == 16


def test_other_tokenizer_is_refused(prepared, debug_config, tmp_path):
    from llamita.tokenizer import train_tokenizer

    corpus = tmp_path / "c.txt"
    rng = random.Random(0)
    corpus.write_text(" ".join("".join(rng.choices("abcdefghijklmnop", k=rng.randint(2, 7))) for _ in range(5000)))
    other = tmp_path / "other-tok"
    train_tokenizer([corpus], 330, other)
    cfg = debug_config(tmp_path / "run", **{"data.tokenizer": str(other)})
    with pytest.raises(ConfigError, match="different tokenizer"):
        pretrain(cfg)
    assert json.loads((prepared["prose"] / "manifest.json").read_text())  # untouched


def test_model_vocabulary_larger_than_the_tokenizer_validates(debug_config, tmp_path):
    # A padded output head (e.g. vocab rounded up to a multiple of 64) still reads shards written for the tokenizer.
    cfg = debug_config(tmp_path / "run", **{"train.max_steps": "2", "eval.interval": "1", "model.vocab_size": "1000"})
    result = pretrain(cfg)
    assert result["step"] == 2 and result["val_loss"] > 0


def test_per_source_validation_scores_each_source_on_its_own(prepared, debug_config, tmp_path):
    """eval.per_source adds val_loss/<source>, each the loss of the final model on that source's validation shards
    alone; the mixed val_loss is the run's without it."""
    from llamita.data.prepare import shard_paths
    from llamita.evaluate.perplexity import validation_loss

    settings = {"train.max_steps": "4", "eval.interval": "2", "eval.batches": "3"}
    plain = pretrain(debug_config(tmp_path / "plain", **settings))
    result = pretrain(debug_config(tmp_path / "run", **settings, **{"eval.per_source": "true"}))
    assert result["val_loss"] == plain["val_loss"] and "val_loss/prose" not in plain
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in rows] == [0, 2, 4] and all({"val_loss/prose", "val_loss/code"} <= r.keys() for r in rows)
    model = load_pretrained(tmp_path / "run").model
    for name in ("prose", "code"):
        alone = validation_loss(
            model,
            shard_paths(prepared[name], "val"),
            seq_len=64,
            batch_size=4,
            max_batches=3,
            device=torch.device("cpu"),
        )
        assert result[f"val_loss/{name}"] == pytest.approx(alone["val_loss"], rel=1e-6)
    assert result["val_loss/prose"] != result["val_loss/code"]
