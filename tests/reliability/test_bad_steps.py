"""NaN/Inf losses: the update is skipped before any weight changes, counted, and too many in a row stop the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamita.pretrain import pretrain
from llamita.pretrained import load_pretrained
from llamita.train import checkpoint as ckpt
from llamita.train import trainer as trainer_module
from llamita.train.metrics import read_metrics

FAST = {"train.threads": "1", "eval.interval": "0", "checkpoint.interval": "0", "checkpoint.keep_last": "0"}
ACCUM = 2  # the debug recipe: 512 tokens per step = 4 sequences x 64 tokens x 2 micro-batches


class PoisonedLoss:
    """`causal_lm_loss` that returns `value` on the steps in `bad`, recording the weights at each step start."""

    def __init__(self, bad: set[int], value: float) -> None:
        self.bad, self.value = bad, value
        self.calls = 0
        self.weights_at_start: dict[int, dict[str, torch.Tensor]] = {}
        self.real = trainer_module.causal_lm_loss

    def __call__(self, model, inputs, targets):
        step = self.calls // ACCUM + 1
        if self.calls % ACCUM == 0:
            self.weights_at_start[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.calls += 1
        loss = self.real(model, inputs, targets)
        return loss * self.value if step in self.bad else loss


def rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


COPIES = {"parallel.copies": "on", "train.dtype": "bf16"}  # bf16 compute copies, updated by CopiesAdamW


@pytest.mark.parametrize(
    ("value", "extra"),
    [(float("nan"), {}), (float("inf"), {}), (float("nan"), COPIES)],
    ids=["nan", "inf", "nan-copies"],
)
def test_bad_steps_are_skipped_and_counted(debug_config, tmp_path, monkeypatch, value, extra):
    poisoned = PoisonedLoss(bad={3, 4}, value=value)
    monkeypatch.setattr(trainer_module, "causal_lm_loss", poisoned)
    run = tmp_path / "run"
    result = pretrain(debug_config(run, **FAST, **extra, **{"train.max_steps": "6"}))
    assert result["step"] == 6
    logged = rows(run)
    assert [r["skipped_steps"] for r in logged] == [0, 0, 1, 2, 2, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged if r["step"] not in (3, 4))
    # Steps 3 and 4 changed no weight: step 5 starts from the weights step 3 started from.
    assert_same_weights(poisoned.weights_at_start[5], poisoned.weights_at_start[3])
    final = load_pretrained(run).model.state_dict()
    assert all(torch.isfinite(v).all() for v in final.values())
    assert ckpt.read_state(ckpt.resolve_checkpoint(run))["skipped_steps"] == 2


def test_too_many_bad_steps_stop_with_last_good_checkpoint(debug_config, tmp_path, monkeypatch):
    poisoned = PoisonedLoss(bad=set(range(3, 100)), value=float("nan"))
    monkeypatch.setattr(trainer_module, "causal_lm_loss", poisoned)
    run = tmp_path / "run"
    cfg = debug_config(run, **FAST, **{"train.max_steps": "20", "train.max_bad_steps": "3"})
    # The host reads a step's outcome one step late: the streak of 3 reached at step 5 stops the run after step 6.
    with pytest.raises(
        FloatingPointError, match=r"3 consecutive steps up to step 5 .*train.max_bad_steps=3\); stopped after step 6"
    ):
        pretrain(cfg)
    assert [r["skipped_steps"] for r in rows(run)] == [0, 0, 1, 2, 3, 4]
    saved = load_pretrained(run)
    assert saved.step == 6
    # The checkpoint holds the weights after step 2, the last good update.
    assert_same_weights(saved.model.state_dict(), poisoned.weights_at_start[3])


def test_loss_spike_is_skipped_and_the_window_is_checkpointed(debug_config, tmp_path, monkeypatch):
    # Step 9's loss is multiplied by 50: far above mean + 3 sigma of the previous 4 applied steps.
    poisoned = PoisonedLoss(bad={9}, value=50.0)
    monkeypatch.setattr(trainer_module, "causal_lm_loss", poisoned)
    run = tmp_path / "run"
    guard = {"train.spike_sigma": "3", "train.spike_window": "4", "train.max_steps": "12"}
    result = pretrain(debug_config(run, **FAST, **guard))
    assert result["step"] == 12
    logged = rows(run)
    assert [r["spike_steps"] for r in logged] == [0] * 8 + [1] * 4
    assert [r["skipped_steps"] for r in logged] == [0] * 8 + [1] * 4
    assert_same_weights(poisoned.weights_at_start[10], poisoned.weights_at_start[9])
    state = ckpt.read_state(ckpt.resolve_checkpoint(run))
    assert state["spike_steps"] == 1 and state["spike_filled"] == 4
    # The window holds the mean losses of the last 4 applied steps (9 was skipped), oldest first.
    applied = [r["loss"] for r in logged if r["step"] != 9][-4:]
    assert state["spike_window"] == pytest.approx(applied, rel=1e-6)


def test_spike_guard_does_not_fire_on_a_normal_run(debug_config, tmp_path):
    run = tmp_path / "run"
    pretrain(
        debug_config(run, **FAST, **{"train.spike_sigma": "6", "train.spike_window": "4", "train.max_steps": "12"})
    )
    assert rows(run)[-1]["spike_steps"] == 0
