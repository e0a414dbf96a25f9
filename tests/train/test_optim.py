"""Learning-rate schedule against its closed form, and AdamW parameter groups."""

from __future__ import annotations

import math

import torch

from llamita.config import OptimConfig
from llamita.train.optim import build_optimizer, lr_at


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
