import dataclasses
import subprocess
import sys

import pytest
import torch

from llamita.model.config import PRESETS, ModelConfig, get_preset

TINY = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, intermediate_size=72, max_seq_len=32)


DOCUMENTED_SHAPES = {
    "debug": {
        "vocab_size": 256,
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "intermediate_size": 172,
    },
    "demo": {
        "vocab_size": 4096,
        "dim": 256,
        "n_layers": 6,
        "n_heads": 8,
        "n_kv_heads": 4,
        "tie_embeddings": True,
    },
    "tinyllama-120m": {"vocab_size": 32000, "dim": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 1},
    "tinyllama-1.1b": {"vocab_size": 32000, "dim": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4},
    "sweep-xs": {"vocab_size": 1024, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "tie_embeddings": True},
    "sweep-s": {"vocab_size": 1024, "dim": 96, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "tie_embeddings": True},
    "sweep-m": {"vocab_size": 1024, "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "tie_embeddings": True},
    "sweep-l": {"vocab_size": 1024, "dim": 192, "n_layers": 6, "n_heads": 6, "n_kv_heads": 3, "tie_embeddings": True},
}
DOCUMENTED_SIZES = {
    "debug": {"max_seq_len": 128},
    "sweep-xs": {"intermediate_size": 172, "max_seq_len": 256},
    "sweep-s": {"intermediate_size": 256, "max_seq_len": 256},
    "sweep-m": {"intermediate_size": 344, "max_seq_len": 256},
    "sweep-l": {"intermediate_size": 512, "max_seq_len": 256},
    "demo": {"intermediate_size": 688, "max_seq_len": 256},
    "tinyllama-120m": {"intermediate_size": 2048, "max_seq_len": 2048},
    "tinyllama-1.1b": {
        "intermediate_size": 5632,
        "max_seq_len": 2048,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
    },
}
PARAM_RANGES = {
    "debug": (1e5, 2e5),
    "demo": (1e6, 1e7),
    "sweep-xs": (0.15e6, 0.17e6),
    "sweep-s": (0.39e6, 0.41e6),
    "sweep-m": (0.85e6, 0.87e6),
    "sweep-l": (2.6e6, 2.7e6),
    "tinyllama-120m": (115e6, 125e6),
    "tinyllama-1.1b": (1e9, 1.2e9),
}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_have_the_documented_shapes(name):
    config = get_preset(name)
    expected = DOCUMENTED_SHAPES[name] | DOCUMENTED_SIZES[name]
    assert {field: getattr(config, field) for field in expected} == expected
    low, high = PARAM_RANGES[name]
    assert low < config.num_params < high
    assert config.tie_embeddings == (name == "demo" or name.startswith("sweep-"))


def test_tinyllama_1b_counts():
    config = get_preset("tinyllama-1.1b")
    assert config.num_params == 1_100_048_384  # the count TinyLlama-1.1B's HF checkpoint reports
    assert config.num_non_embedding_params == 1_100_048_384 - 2 * 32000 * 2048
    assert config.flops_per_token(2048) == pytest.approx(7.31e9, rel=1e-3)
    assert config.flops_per_token() == config.flops_per_token(2048)


def test_flops_per_token_by_hand():
    c = TINY
    per_layer = 48 * 48 * 2 + 48 * 16 * 2 + 3 * 48 * 72 + 2 * 48  # q,o + k,v (2 kv heads of 8) + mlp + norms
    non_embedding = 2 * per_layer + 48
    assert c.num_non_embedding_params == non_embedding
    assert c.flops_per_token(10) == 6 * (non_embedding + 97 * 48) + 12 * 2 * 48 * 10


@pytest.mark.parametrize("tied", [False, True])
def test_param_counts_match_transformers(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dataclasses.replace(TINY, tie_embeddings=tied)
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**config.to_hf_config_dict()))
    assert sum(p.numel() for p in hf.parameters()) == config.num_params
    embedding = hf.model.embed_tokens.weight.numel()
    assert config.num_params - config.num_non_embedding_params == embedding * (1 if tied else 2)


def test_hf_config_dict_makes_an_equivalent_llama_config():
    from transformers import LlamaConfig

    config = dataclasses.replace(TINY, rope_theta=500.0, norm_eps=1e-6, tie_embeddings=True)
    hf = LlamaConfig(**config.to_hf_config_dict())
    assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size) == (97, 48, 72)
    assert (hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads) == (2, 6, 2)
    assert (hf.max_position_embeddings, hf.rms_norm_eps, hf.tie_word_embeddings) == (32, 1e-6, True)
    assert hf.head_dim == config.head_dim
    assert (hf.attention_bias, hf.mlp_bias, hf.hidden_act) == (False, False, "silu")
    # transformers >= 4.56 moved rope_theta into rope_parameters.
    rope_parameters = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}
    assert rope_parameters["rope_theta"] == 500.0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"dim": 50}, "dim"),
        ({"n_kv_heads": 4}, "n_heads"),
        ({"n_layers": 0}, "n_layers"),
        ({"n_layers": True}, "n_layers"),
        ({"vocab_size": 96.5}, "vocab_size"),
        ({"n_heads": 16, "n_kv_heads": 4}, "head dim"),  # 48 / 16 = 3 is odd
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"tie_embeddings": "yes"}, "tie_embeddings"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **overrides)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.dim = 64


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model preset 'tiny'") as info:
        get_preset("tiny")
    for name in PRESETS:
        assert name in str(info.value)


def test_reading_configs_does_not_import_torch():
    code = "import sys; from llamita.model import get_preset; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
