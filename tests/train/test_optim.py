"""Learning-rate schedules against their closed forms, the batch-size schedule, and AdamW parameter groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llamita.config import OptimConfig, TrainConfig
from llamita.train.optim import BatchSchedule, LRSchedule, build_optimizer, lr_at


def test_warmup_then_cosine_to_min():
    cfg = OptimConfig(lr=4e-4, min_lr=4e-5, warmup_steps=10)
    total = 110
    assert lr_at(0, cfg, total) == 4e-4 / 10
    assert lr_at(9, cfg, total) == 4e-4
    assert math.isclose(lr_at(10, cfg, total), 4e-4)
    mid = lr_at(60, cfg, total)  # half-way through the decay: the mean of lr and min_lr
    assert math.isclose(mid, (4e-4 + 4e-5) / 2, rel_tol=1e-12)
    assert math.isclose(lr_at(110, cfg, total), 4e-5)
    assert lr_at(500, cfg, total) == lr_at(110, cfg, total)
    rates = [lr_at(s, cfg, total) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_no_decay_on_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.LayerNorm(4, bias=False))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.ndim for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and [p.ndim for p in no_decay["params"]] == [1]


def _reference_lr(tokens: float, unit: float, lr: float, min_lr: float, warmup: int, span: float, kind: str) -> float:
    """The schedules written out in float64 from their definitions, in tokens: `unit` tokens make one step."""
    s = np.float64(tokens) / np.float64(unit)  # position in steps of the first batch
    lr, min_lr = np.float64(lr), np.float64(min_lr)
    if s < warmup:
        return float(lr * (s + 1) / warmup)
    if kind == "constant":
        return float(lr)
    if kind == "cosine":
        x = np.clip((s - warmup) / max(1.0, span - warmup), 0.0, 1.0)
        return float(min_lr + (lr - min_lr) * (np.cos(np.pi * x) + 1) / 2)
    start = span * (1 - 0.25)  # decay_fraction 0.25
    if s < start:
        return float(lr)
    x = np.clip((s - start) / (span - start), 0.0, 1.0)
    shape = 1 - x if kind == "wsd-linear" else 1 - np.sqrt(x)
    return float(lr - (lr - min_lr) * (1 - shape))


@pytest.mark.parametrize("kind", ["cosine", "wsd-linear", "wsd-1-sqrt", "constant"])
def test_schedules_against_their_float64_formulas(kind):
    """Every step of a 200-step run with a batch that grows x2 then x4, against the formula in tokens."""
    schedule, _, shape = kind.partition("-")
    cfg = OptimConfig(
        lr=3e-3, min_lr=1e-4, warmup_steps=8, schedule=schedule, decay_fraction=0.25, decay_shape=shape or "1-sqrt"
    )
    train = TrainConfig(
        global_batch_tokens=64,
        batch_stages=[
            {"from_tokens": 1000, "global_batch_tokens": 128},
            {"from_tokens": 5000, "global_batch_tokens": 256},
        ],
    )
    batch = BatchSchedule.of(train)
    lr = LRSchedule.of(cfg, batch, max_steps=200)
    span = batch.tokens_after(200) / 64
    tokens, rates = 0, []
    for _ in range(200):
        expected = _reference_lr(tokens, 64, 3e-3, 1e-4, 8, span, kind)
        assert lr.at(tokens) == pytest.approx(expected, rel=1e-12, abs=1e-18), tokens
        rates.append(lr.at(tokens))
        tokens += batch.at(tokens)
    assert lr.at(tokens) == pytest.approx(3e-3 if schedule == "constant" else 1e-4, rel=1e-9)
    assert all(a >= b for a, b in zip(rates[8:], rates[9:]))  # no rise after the warmup


def test_a_larger_batch_neither_stretches_nor_warps_the_schedule():
    """At the same tokens seen, a run whose batch grows x4 has the LR of the run that keeps its first batch."""
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, schedule_tokens=64 * 400)
    fixed = LRSchedule.of(cfg, BatchSchedule.of(TrainConfig(global_batch_tokens=64)), max_steps=400)
    grown = BatchSchedule.of(
        TrainConfig(global_batch_tokens=64, batch_stages=[{"from_tokens": 6400, "global_batch_tokens": 256}])
    )
    staged = LRSchedule.of(cfg, grown, max_steps=175)
    assert grown.tokens_after(175) == 64 * 400  # 100 steps of 64, then 75 of 256
    tokens = 0
    for _ in range(175):
        assert staged.at(tokens) == fixed.at(tokens)  # bit for bit
        tokens += grown.at(tokens)


def test_without_a_batch_schedule_the_lr_is_that_of_the_step():
    """The LR as a function of tokens equals `lr_at(step)` exactly when the batch never changes."""
    cfg = OptimConfig(lr=4e-4, min_lr=4e-5, warmup_steps=10)
    lr = LRSchedule.of(cfg, BatchSchedule.of(TrainConfig(global_batch_tokens=2_097_152)), max_steps=110)
    for step in range(130):
        assert lr.at(step * 2_097_152) == lr_at(step, cfg, 110)


def _simulate(batch: BatchSchedule, steps: int) -> list[int]:
    """Tokens seen before each step, stepping one batch at a time."""
    seen = [0]
    for _ in range(steps):
        seen.append(seen[-1] + batch.at(seen[-1]))
    return seen


@pytest.mark.parametrize(
    "stages",
    [
        [],
        [{"from_tokens": 300, "global_batch_tokens": 40}],
        [{"from_tokens": 301, "global_batch_tokens": 40}, {"from_tokens": 302, "global_batch_tokens": 80}],
        [{"from_tokens": 100, "global_batch_tokens": 10}, {"from_tokens": 1000, "global_batch_tokens": 100}],
    ],
)
def test_batch_schedule_positions_match_stepping_through_it(stages):
    """A step takes the batch of the last stage started at or before its tokens; the closed forms of the positions
    (`tokens_after`, `steps_within`) match stepping through the run."""
    batch = BatchSchedule.of(TrainConfig(global_batch_tokens=20, batch_stages=stages))
    for tokens in range(0, 2000, 3):
        assert batch.at(tokens) == [20, *(s["global_batch_tokens"] for s in stages if s["from_tokens"] <= tokens)][-1]
    seen = _simulate(batch, 120)
    for steps in range(120):
        assert batch.tokens_after(steps) == seen[steps]
    for limit in range(0, seen[-1], 7):
        assert batch.steps_within(limit) == max(k for k in range(121) if seen[k] <= limit)
