"""`build_data`: the recipe's data section is checked, with the field named, before any shard is read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llamita import pretrain
from llamita.config import ConfigError
from llamita.pretrain import build_data
from llamita.tokenizer import Tokenizer


def _build(cfg, prepared):
    return build_data(cfg, Tokenizer.load(prepared["tokenizer"]), 0, 1, torch.device("cpu"))


@pytest.fixture
def no_manifest_read(monkeypatch):
    """Fail a test that reads a manifest: its error must come from the config alone."""

    def refuse(path):
        raise AssertionError(f"read the manifest of {path} before the config was checked")

    monkeypatch.setattr(pretrain, "load_manifest", refuse)


def test_duplicate_source_names_are_refused_naming_both(prepared, debug_config, tmp_path, no_manifest_read):
    other = tmp_path / "other-prose"
    sources = f"[{{name: prose, path: '{prepared['prose']}'}}, {{name: code, path: '{prepared['code']}'}}, " + (
        f"{{name: prose, path: '{other}'}}]"
    )
    cfg = debug_config(tmp_path / "run", **{"data.sources": sources})
    with pytest.raises(ConfigError) as err:
        _build(cfg, prepared)
    message = str(err.value)
    assert "data.sources[0]" in message and "data.sources[2]" in message and "'prose'" in message
    assert str(prepared["prose"]) in message and str(other) in message


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"data.sources": "[{name: prose, path: P, weight: 1}, {name: code, path: C, weight: -0.3}]"},
            r"^data\.sources\[1\]\.weight: must be a finite number >= 0, got -0.3",
        ),
        (
            {"data.sources": "[{name: prose, path: P, weight: 0}, {name: code, path: C, weight: 0}]"},
            r"^data\.sources: all weights are zero",
        ),
        (
            {"data.stages": "[{steps: 10, weights: {prose: 1, code: 1}}, {weights: {prose: 1, code: -1}}]"},
            r"^data\.stages\[1\]\.weights\.code: must be a finite number >= 0, got -1",
        ),
        (
            {"data.stages": "[{steps: 10, weights: {prose: 1, code: 1}}, {weights: {prose: 1, web: 1}}]"},
            r"^data\.stages\[1\]\.weights: must weigh exactly the sources \['code', 'prose'\]; missing \['code'\], "
            r"unknown \['web'\]",
        ),
        ({"data.stages": "[{steps: 10, weights: {prose: 1, web: 1}}]"}, r"^data\.stages\[0\]\.weights: .*'web'"),
        (
            {"data.stages": "[{steps: 0, weights: {prose: 1, code: 1}}]"},
            r"^data\.stages\[0\]\.steps: must be a positive integer, got 0",
        ),
        ({"data.stages": "[{steps: -5, weights: {prose: 1, code: 1}}]"}, r"^data\.stages\[0\]\.steps: .*-5"),
        (
            {"data.stages": "[{steps: ten, weights: {prose: 1, code: 1}}]"},
            r"^data\.stages\[0\]\.steps: must be an integer or null, got 'ten'",
        ),
        ({"data.stages": "[{steps: 10}]"}, r"^data\.stages\[0\]: missing field 'weights'"),
        ({"data.stages": "[{steps: 10, weights: [1, 2]}]"}, r"^data\.stages\[0\]\.weights: must be a non-empty"),
        ({"data.stages": "[{weights: {prose: 1, code: 1}, ramp: 3}]"}, r"^data\.stages\[0\]: unknown field"),
        ({"data.stages": "[{weights: {prose: 0, code: 0}}]"}, r"^data\.stages\[0\]\.weights: all weights are zero"),
        (
            {"data.stages": "[{weights: {prose: 1, code: 0}}, {weights: {prose: 0, code: 1}}]"},
            r"^data\.stages\[0\]\.steps: is null",
        ),
    ],
)
def test_malformed_mixture_is_a_config_error_naming_the_field(
    prepared, debug_config, tmp_path, overrides, match, no_manifest_read
):
    overrides = {
        k: v.replace(" P,", f" '{prepared['prose']}',").replace(" C,", f" '{prepared['code']}',")
        for k, v in overrides.items()
    }
    cfg = debug_config(tmp_path / "run", **overrides)
    with pytest.raises(ConfigError, match=match):
        _build(cfg, prepared)


def test_source_without_train_shards_is_refused_naming_it(prepared, debug_config, tmp_path, monkeypatch):
    # A manifest that an older llamita wrote for inputs without documents: no train shards at all.
    empty = tmp_path / "empty"
    shutil.copytree(prepared["code"], empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["split"] != "train"]
    (empty / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(pretrain, "verify_shards", lambda *a, **k: pytest.fail("shards read before the check"))
    sources = f"[{{name: prose, path: '{prepared['prose']}'}}, {{name: code, path: '{empty}'}}]"
    cfg = debug_config(tmp_path / "run", **{"data.sources": sources})
    with pytest.raises(ConfigError, match=r"data\.sources\[1\] \('code', .*\) has no training shards") as err:
        _build(cfg, prepared)
    assert str(empty) in str(err.value)


def test_the_model_context_and_the_tokenizer_copy_are_the_trained_length(prepared, debug_config, tmp_path):
    from llamita.pretrained import load_pretrained

    # The debug preset's context is 128; a run on 32-token windows has a 32-token model, and says so everywhere.
    cfg = debug_config(tmp_path / "run", **{"data.seq_len": "32", "train.max_steps": "1", "eval.interval": "0"})
    pretrain.pretrain(cfg)
    pre = load_pretrained(cfg.out_dir)
    assert pre.model_config.max_seq_len == 32
    saved = json.loads((tmp_path / "run" / "tokenizer" / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 32 == pre.tokenizer.model_max_length


def test_a_run_from_pretrained_weights_keeps_their_context(prepared, debug_config, tmp_path):
    base = debug_config(tmp_path / "base", **{"train.max_steps": "1", "eval.interval": "0", "data.seq_len": "64"})
    pretrain.pretrain(base)
    cfg = debug_config(
        tmp_path / "cont",
        **{"init.from": base.out_dir, "data.seq_len": "32", "train.max_steps": "1", "eval.interval": "0"},
    )
    model_config = pretrain.build_model_config(cfg, Tokenizer.load(prepared["tokenizer"]))
    assert model_config.max_seq_len == 64
