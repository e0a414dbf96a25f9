"""Fixtures for the interop tests: tiny transformers Llama directories and a trained llamita run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llamita.tokenizer import Tokenizer

TINY_HF = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rope_theta": 5000.0,
    "rms_norm_eps": 1e-5,
}


@pytest.fixture(scope="session")
def hf_model_dir(prepared, tmp_path_factory) -> Callable[..., Path]:
    """A factory of random GQA `LlamaForCausalLM` directories (save_pretrained + the fixture tokenizer).

    ``hf_model_dir(tied=False, dtype=torch.float32)``; each combination is built once per session.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = Tokenizer.load(prepared["tokenizer"])
    built: dict[tuple, Path] = {}

    def make(tied: bool = False, dtype: torch.dtype = torch.float32) -> Path:
        key = (tied, dtype)
        if key not in built:
            out = tmp_path_factory.mktemp(f"hf_tied{int(tied)}_{str(dtype).split('.')[-1]}")
            torch.manual_seed(1 + tied)
            config = LlamaConfig(
                vocab_size=tokenizer.vocab_size,
                tie_word_embeddings=tied,
                bos_token_id=tokenizer.bos_id,
                eos_token_id=tokenizer.eos_id,
                **TINY_HF,
            )
            model = LlamaForCausalLM(config).to(dtype)
            with torch.no_grad():
                for p in model.parameters():  # norms away from 1, so a swapped norm weight shows
                    if p.ndim == 1:
                        p.uniform_(0.5, 1.5)
            model.save_pretrained(out)
            tokenizer.save(out)
            built[key] = out
        return built[key]

    return make


@pytest.fixture(scope="session")
def trained_run(debug_config, tmp_path_factory) -> Path:
    """A llamita run of the `debug` preset (untied, GQA) trained 60 steps on the fixture corpus."""
    from llamita.pretrain import pretrain

    out = tmp_path_factory.mktemp("trained") / "run"
    pretrain(
        debug_config(
            out,
            **{"train.max_steps": "60", "checkpoint.interval": "60", "eval.interval": "60", "train.threads": "2"},
        )
    )
    return out
