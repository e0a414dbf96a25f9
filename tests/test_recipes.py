"""Bundled recipes load and validate without data; the TinyLlama v1.1 family fits together stage after stage."""

from __future__ import annotations

import dataclasses

import pytest

from llamita.config import RECIPES_DIR, RunConfig, load_config, to_dict
from llamita.pretrain import build_mixture, global_batch_sequences, resolve_steps
from llamita.train.optim import BatchSchedule, LRSchedule

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
V11 = [name for name in RECIPES if name.startswith("tinyllama-v1.1-")]
B = 2048 * 880  # ~1.8M tokens


@pytest.mark.parametrize("name", RECIPES)
def test_every_bundled_recipe_loads_and_validates(name):
    cfg = load_config(name)  # types, ranges, batch stages, branch settings (config.check_config)
    if cfg.data.sources:
        build_mixture(cfg)  # names, weights and stages
    global_batch_sequences(cfg, world_size=1)  # every batch splits into whole micro-batches
    if cfg.train.max_steps or cfg.train.max_tokens:
        assert resolve_steps(cfg) > 0


def _lineage() -> dict[str, tuple[RunConfig, RunConfig | None]]:
    """Each v1.1 recipe's config and its parent's (the recipe whose out_dir it branches from)."""
    configs = {name: load_config(name) for name in V11}
    by_dir = {cfg.out_dir: cfg for cfg in configs.values()}
    return {name: (cfg, by_dir.get(cfg.init.branch_from)) for name, cfg in configs.items()}


def _end(cfg: RunConfig) -> tuple[int, int]:
    """(steps, tokens) at the end of a run."""
    steps = resolve_steps(cfg)
    return steps, BatchSchedule.of(cfg.train).tokens_after(steps)


def test_the_v11_family_is_one_base_three_stage_twos_and_three_cooldowns():
    lineage = _lineage()
    assert len(V11) == 7
    roots = [n for n, (_, parent) in lineage.items() if parent is None]
    assert roots == ["tinyllama-v1.1-base"]
    base = lineage["tinyllama-v1.1-base"][0]
    assert [s.name for s in base.data.sources] == ["slimpajama"]
    assert base.train.global_batch_tokens == B and base.data.seq_len == 2048
    shares = {
        "stage2": {"slimpajama": 1.0},
        "math-code-stage2": {"slimpajama": 0.75, "starcoderdata": 0.15, "proofpile": 0.10},
        "chinese-stage2": {"slimpajama": 0.5, "skypile": 0.5},
    }
    for variant, final in shares.items():
        stage2, parent = lineage[f"tinyllama-v1.1-{variant}"]
        cooldown, cooldown_parent = lineage[f"tinyllama-v1.1-{variant.removesuffix('stage2')}cooldown"]
        assert parent is base and cooldown_parent is stage2
        mixture = build_mixture(stage2)
        assert mixture.weights(10**6) == pytest.approx(final) and build_mixture(cooldown).weights(0) == pytest.approx(
            final
        )
        if len(final) > 1:  # the domain share rises linearly from 0 over the first ~6B tokens of stage 2
            assert mixture.weights(0)["slimpajama"] == 1.0
            ramp = mixture.stages[0].steps
            assert abs(ramp * B - 6e9) < B
            middle = mixture.weights((ramp - 1) // 2)
            assert middle["slimpajama"] == pytest.approx((1 + final["slimpajama"]) / 2, abs=1e-3)


@pytest.mark.parametrize("name", [n for n in V11 if n != "tinyllama-v1.1-base"])
def test_each_v11_branch_continues_its_parent(name):
    """A branch starts where its parent stops, with the parent's model, optimizer, seed and sequence length; its
    batch schedule reproduces the parent's positions; the LR continues bit for bit; the stages end at ~1.5T, ~1.85T
    and 2T tokens."""
    cfg, parent = _lineage()[name]
    same = ("model", "optim", "data.seq_len", "data.tokenizer", "train.seed", "train.global_batch_tokens")
    for key in same:
        section, _, leaf = key.partition(".")
        a, b = to_dict(getattr(cfg, section)), to_dict(getattr(parent, section))
        assert (a[leaf] if leaf else a) == (b[leaf] if leaf else b), key
    steps, tokens = _end(parent)
    batch = BatchSchedule.of(cfg.train)
    assert batch.tokens_after(steps) == tokens  # what DataLoader.branch_from checks
    lr, parent_lr = (LRSchedule.of(c.optim, BatchSchedule.of(c.train), resolve_steps(c)) for c in (cfg, parent))
    assert lr.at(tokens) == parent_lr.at(tokens)
    end_steps, end_tokens = _end(cfg)
    assert end_steps > steps
    if "cooldown" in name:
        assert batch.at(tokens) == 4 * B  # the batch cooldown applies from the first step
        assert 2e12 - 4 * B < end_tokens <= 2e12
    else:
        assert 1.5e12 <= tokens < 1.5e12 + B and 1.85e12 <= end_tokens < 1.85e12 + B
    assert dataclasses.asdict(cfg.parallel) == dataclasses.asdict(parent.parallel)
    for world in (1, 2, 4, 8, 16):
        global_batch_sequences(cfg, world)
