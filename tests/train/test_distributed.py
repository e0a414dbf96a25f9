"""Multi-process training on CPU: 2 gloo processes under torchrun (FSDP2, HSDP) against one plain process.

The runs share one fixture: a 1-process run and a 2-process run of the same 10 steps with a checkpoint at step 5,
each resumed from the other's checkpoint, and a 2-process HSDP run. The `debug` model ties its embeddings here,
the case where FSDP2 has to keep one parameter in two modules.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llamita.model import Llama, ModelConfig
from llamita.pretrain import pretrain
from llamita.pretrained import load_pretrained
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics
from pretrain_runs import finish, torchrun

STEPS = 10
SETTINGS = {
    "train.max_steps": str(STEPS),
    "train.threads": "1",
    "checkpoint.interval": "5",
    "checkpoint.keep_last": "0",
    "eval.interval": "5",
    "model.tie_embeddings": "true",
}


def rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def resume_copy(run: Path, to: Path) -> Path:
    """A copy of `run` cut back to its step-5 checkpoint, as if it had stopped there."""
    shutil.copytree(run, to)
    shutil.rmtree(ckpt.checkpoint_path(to, STEPS))
    return to


@pytest.fixture(scope="module")
def runs(debug_config, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    out = {"one": root / "one", "two": root / "two"}
    pretrain(debug_config(out["one"], **SETTINGS))
    finish(torchrun(debug_config(out["two"], **SETTINGS)))
    out["two_then_one"] = resume_copy(out["two"], root / "two_then_one")
    pretrain(debug_config(out["two_then_one"], **SETTINGS))
    out["one_then_two"] = resume_copy(out["one"], root / "one_then_two")
    finish(torchrun(debug_config(out["one_then_two"], **SETTINGS)))
    out["hsdp"] = root / "hsdp"
    finish(torchrun(debug_config(out["hsdp"], **SETTINGS, **{"parallel.dp_replicate": "2"})))
    return out


def assert_same_losses(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=tol), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], abs=tol), (x, y)
        assert x["lr"] == y["lr"] and x["tokens"] == y["tokens"]


def test_two_processes_equal_one(runs):
    """FSDP2 over 2 ranks, same global batch: the per-step losses and grad norms of one process."""
    one, two = rows(runs["one"]), rows(runs["two"])
    assert [r["step"] for r in one] == list(range(1, STEPS + 1))
    assert_same_losses(two, one)
    val = [
        [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
        for run in (runs["one"], runs["two"])
    ]
    assert len(val[0]) == 3 and val[1] == pytest.approx(val[0], abs=1e-5)  # the same windows, split over ranks
    # Only rank 0 writes the run's files.
    assert (runs["two"] / "config.yaml").is_file() and (runs["two"] / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in ckpt.checkpoint_path(runs["two"], 5).glob("rng_rank*.pt")) == [
        "rng_rank0.pt",
        "rng_rank1.pt",
    ]


def test_hsdp_equals_one(runs):
    """A 2 x 1 mesh (replicate across "nodes", shard within): the same losses."""
    assert_same_losses(rows(runs["hsdp"]), rows(runs["one"]))


@pytest.mark.parametrize("resumed", ["two_then_one", "one_then_two"])
def test_checkpoint_resumes_on_another_number_of_ranks(runs, resumed):
    """DCP reshards model and optimizer; the loader state is global, so the sample order continues exactly."""
    rows_resumed = rows(runs[resumed])
    assert [r["step"] for r in rows_resumed] == list(range(1, STEPS + 1))
    assert_same_losses(rows_resumed[5:], rows(runs["one"])[5:])


def test_load_pretrained_reads_a_sharded_checkpoint(runs):
    """A single process loads what 2 FSDP2 ranks saved: Hugging Face names, tied head, the same weights."""
    two, one = load_pretrained(runs["two"]), load_pretrained(runs["one"])
    assert two.step == STEPS
    config: ModelConfig = two.model_config
    assert list(two.model.state_dict()) == list(Llama(config).state_dict())
    assert two.model.lm_head.weight is two.model.model.embed_tokens.weight
    for name, tensor in one.model.state_dict().items():
        torch.testing.assert_close(two.model.state_dict()[name], tensor, rtol=0, atol=1e-5, msg=name)
