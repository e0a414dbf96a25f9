"""Continual pretraining: `init.from` starts a run from an HF directory's weights with a fresh optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamita.config import ConfigError
from llamita.pretrain import build_data, pretrain
from llamita.tokenizer import Tokenizer
from llamita.train.metrics import read_metrics

transformers = pytest.importorskip("transformers")


def _hf_model(vocab_size: int, tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=20000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(config).eval()
    out = tmp_path / "hf"
    model.save_pretrained(out)
    return model, out


def test_first_step_loss_equals_the_hf_model(prepared, debug_config, tmp_path):
    """The loss logged at step 1 (computed before the first update) is the HF model's loss on the same batch."""
    tokenizer = Tokenizer.load(prepared["tokenizer"])
    hf, hf_dir = _hf_model(tokenizer.vocab_size, tmp_path)
    cfg = debug_config(tmp_path / "run", **{"init.from": str(hf_dir), "train.max_steps": "2", "eval.interval": "0"})
    pretrain(cfg)
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][0]

    loader, _ = build_data(cfg, tokenizer, 0, 1, torch.device("cpu"))
    losses = []
    with torch.no_grad():
        for _ in range(loader.micro_steps_per_step):
            inputs, targets = next(loader)
            logits = hf(input_ids=inputs).logits  # [B, T, V]
            losses.append(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()))
    loader.close()
    assert logged["step"] == 1
    assert logged["loss"] == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)


def test_init_from_refuses_a_smaller_vocabulary(prepared, debug_config, tmp_path):
    tokenizer = Tokenizer.load(prepared["tokenizer"])
    _, hf_dir = _hf_model(tokenizer.vocab_size - 10, tmp_path)
    cfg = debug_config(tmp_path / "run", **{"init.from": str(hf_dir)})
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        pretrain(cfg)


def test_an_imported_run_is_not_resumed(prepared, debug_config, tmp_path):
    """`import hf` writes weights only: pretraining into that directory says to use init.from instead."""
    from llamita.interop import import_hf
    from llamita.train.checkpoint import CheckpointError

    tokenizer = Tokenizer.load(prepared["tokenizer"])
    _, hf_dir = _hf_model(tokenizer.vocab_size, tmp_path)
    tokenizer.save(hf_dir)
    run = tmp_path / "imported"
    import_hf(hf_dir, run)
    with pytest.raises(CheckpointError, match="--init.from"):
        pretrain(debug_config(run))
    result = pretrain(debug_config(tmp_path / "new", **{"init.from": str(run), "train.max_steps": "2"}))
    assert result["step"] == 2
