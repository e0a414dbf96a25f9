"""Initialising a built model from a Hugging Face directory or a llamita checkpoint (continual pretraining)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from llamita.interop import load_init_weights, read_model_config
from llamita.model import Llama
from llamita.pretrained import load_pretrained


def test_init_from_hf_directory_copies_every_tensor(hf_model_dir):
    source = hf_model_dir(tied=True, dtype=torch.bfloat16)
    config = read_model_config(source)
    assert config.tie_embeddings and config.n_kv_heads == 2 and config.rope_theta == 5000.0
    model = Llama(config)
    load_init_weights(model, source)
    state = model.state_dict()
    with safe_open(str(source / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            assert state[name].dtype == torch.float32  # bf16 weights, upcast exactly into the fp32 model
            assert torch.equal(state[name], f.get_tensor(name).float()), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_init_from_llamita_run_equals_its_checkpoint(trained_run):
    pre = load_pretrained(trained_run)
    longer = dataclasses.replace(pre.model_config, max_seq_len=2 * pre.model_config.max_seq_len, init_std=0.01)
    model = Llama(longer)  # a longer context and another init scale shape no weight, so they may differ
    load_init_weights(model, trained_run)
    for name, tensor in pre.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_init_refuses_another_architecture_naming_the_fields(trained_run):
    config = read_model_config(trained_run)
    other = Llama(dataclasses.replace(config, n_layers=3, tie_embeddings=True))
    with pytest.raises(ValueError, match=r"n_layers: 3 != 2; tie_embeddings: True != False"):
        load_init_weights(other, trained_run)
