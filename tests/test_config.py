"""Run config: recipes, dotted overrides, type conversion, errors naming the field, safe YAML."""

from __future__ import annotations

import pytest

from llamita.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    field_docs,
    iter_fields,
    load_config,
    save_config,
    to_dict,
)


def test_bundled_recipes_load():
    for name in ("demo", "debug", "tinyllama-1.1b"):
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
    tl = load_config("tinyllama-1.1b")
    assert tl.optim.lr == 4e-4 and tl.optim.min_lr == 4e-5 and tl.optim.warmup_steps == 2000
    assert tl.train.global_batch_tokens == 2 * 1024 * 1024 and tl.data.seq_len == 2048
    assert (tl.optim.beta1, tl.optim.beta2, tl.optim.weight_decay, tl.optim.grad_clip) == (
        0.9,
        0.95,
        0.1,
        1.0,
    )
    assert tl.train.max_tokens == 3 * 10**12
    weights = {s.name: s.weight for s in tl.data.sources}
    assert weights == {"slimpajama": 0.693584, "starcoderdata": 0.306416}


def test_overrides_convert_types():
    cfg = load_config(
        "debug",
        {
            "optim.lr": "3e-4",
            "train.max_steps": "7",
            "log.tensorboard": "true",
            "model.vocab_size": "none",
            "data.sources": "[{name: a, path: /x, weight: 2}]",
        },
    )
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.log.tensorboard is True
    assert cfg.model.vocab_size is None
    assert cfg.data.sources[0].name == "a" and cfg.data.sources[0].weight == 2.0


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("optim.lrr", "1", "optim.lrr"),
        ("nosuch.key", "1", "nosuch"),
        ("train.max_steps", "ten", "train.max_steps"),
        ("log.progress", "maybe", "log.progress"),
    ],
)
def test_bad_override_names_the_key(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("debug", {key: value})


def test_bad_recipe_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-3\n  betas: [0.9, 0.95]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml|optim.*betas"):
        load_config(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(str(broken))
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-recipe")


def test_yaml_cannot_run_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("out_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load_config(str(evil))


def test_round_trip_and_docs(tmp_path):
    cfg = load_config("demo", {"optim.lr": "1e-3"})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == cfg
    assert config_from_dict(to_dict(cfg)) == cfg
    assert field_docs(type(cfg.optim))["lr"].startswith("Peak learning rate")
    keys = {k: doc for k, _, doc in iter_fields()}
    assert "optim.lr" in keys and "train.global_batch_tokens" in keys
    assert all(doc for k, doc in keys.items()), [k for k, d in keys.items() if not d]
