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


def test_resume_changes_name_each_key_and_whether_it_changes_the_math():
    from llamita.config import UNSET, changes_math, describe_change, resume_changes

    sources = "[{name: a, path: /x, weight: 1}]"
    saved = to_dict(load_config("debug", {"data.sources": sources}))
    del saved["train"]["spike_window"]  # a field added since the checkpoint counts at its default
    two = "[{name: a, path: /moved, weight: 1}, {name: b, path: /y, weight: 2}]"
    new = load_config("debug", {"data.sources": two, "optim.lr": "5e-3", "log.interval": "3", "init.from": "/w"})
    changes = resume_changes(saved, new)
    assert changes == {
        "data.sources[0].path": ("/x", "/moved"),
        "data.sources[1].name": (UNSET, "b"),
        "data.sources[1].path": (UNSET, "/y"),
        "data.sources[1].weight": (UNSET, 2.0),
        "optim.lr": (1e-3, 5e-3),
        "log.interval": (5, 3),
    }  # init.from (and checkpoint.resume) say where a run starts: never compared
    math = [k for k in changes if changes_math(k)]
    assert math == ["data.sources[1].name", "data.sources[1].weight", "optim.lr"]
    assert describe_change("optim.lr", *changes["optim.lr"]) == "optim.lr: 0.001 -> 0.005"
    assert describe_change("data.sources[1].name", UNSET, "b") == 'data.sources[1].name: unset -> "b"'
    assert resume_changes(saved, load_config("debug", {"data.sources": sources})) == {}


def test_every_resume_free_key_is_a_config_key():
    from llamita.config import RESUME_FREE, RESUME_IGNORED, SourceConfig

    keys = {k for k, _, _ in iter_fields()}
    sections = {k.split(".")[0] for k in keys}
    for free in (*RESUME_FREE, *RESUME_IGNORED):
        head, _, item = free.partition("[].")  # data.sources[].path: a field of every source
        assert head in keys | sections, free
        assert not item or item in {k for k, _, _ in iter_fields(SourceConfig)}, free


@pytest.mark.parametrize("value", ["10.5", "1e-1", "true"])
def test_a_command_line_integer_is_checked_as_yaml_checks_it(value, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected int"):
        load_config("debug", {"train.max_steps": value})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"train: {{max_steps: {value}}}\n")
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected int"):
        load_config(str(recipe))
    assert load_config("debug", {"train.max_steps": "1e3"}).train.max_steps == 1000


def test_unknown_keys_name_the_recipe_and_the_section(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("foo: 1\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: unknown key\(s\) \['foo'\] in the top level; valid keys"):
        load_config(str(recipe))
    recipe.write_text("optim: {lrr: 1}\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: unknown key\(s\) \['lrr'\] in section 'optim'"):
        load_config(str(recipe))


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("data.seq_len", "0", "data.seq_len: must be >= 1"),
        ("train.micro_batch", "0", "train.micro_batch: must be >= 1"),
        ("train.global_batch_tokens", "0", "train.global_batch_tokens: must be >= 1"),
        ("optim.lr", "-1", "optim.lr: must be >= 0"),
        ("optim.beta1", "1", r"optim.beta1: must be in \[0, 1\)"),
        ("optim.eps", "0", "optim.eps: must be > 0"),
        ("optim.lr", "nan", "optim.lr: must be >= 0"),
        ("log.interval", "0", "log.interval: must be >= 1"),
        ("eval.batches", "0", "eval.batches: must be >= 1"),
        ("checkpoint.keep_last", "-1", "checkpoint.keep_last: must be >= 0"),
        ("train.spike_window", "1", "train.spike_window: must be >= 2"),
        ("optim.min_lr", "1", "optim.min_lr: 1 is above optim.lr"),
        ("model.preset", "nope", "model.preset: unknown preset 'nope'"),
    ],
)
def test_values_no_run_can_use_are_refused_naming_the_key(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("debug", {key: value})


def test_yaml_errors_are_one_line_naming_the_place(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("train:\n  max_steps: [1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(recipe))
    assert str(e.value).startswith(f"{recipe}:3:1: not valid YAML: ") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^data\.sources: not valid YAML \(.*\): '\[\{name: a'$"):
        load_config("debug", {"data.sources": "[{name: a"})
