"""The model's shape: a frozen ModelConfig, named presets, and parameter / FLOP counts.

No torch import, so the CLI, planners and recipe validation can read sizes without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_POSITIVE_INTS = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "intermediate_size",
    "max_seq_len",
)
_POSITIVE_FLOATS = ("rope_theta", "norm_eps", "init_std")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-architecture decoder; defaults are TinyLlama-1.1B's.

    Field names are ours; `to_hf_config_dict()` maps them to transformers' LlamaConfig.
    """

    vocab_size: int = 32000
    """Number of token ids (embedding rows)."""
    dim: int = 2048
    """Hidden size (HF `hidden_size`)."""
    n_layers: int = 22
    """Number of transformer blocks."""
    n_heads: int = 32
    """Number of query heads."""
    n_kv_heads: int = 4
    """Number of key/value heads (grouped-query attention); must divide n_heads."""
    intermediate_size: int = 5632
    """Hidden size of the SwiGLU MLP."""
    max_seq_len: int = 2048
    """Longest sequence the RoPE tables (and HF `max_position_embeddings`) cover."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share one matrix between the token embedding and the output head."""
    init_std: float = 0.02
    """HF `initializer_range`, written to exported configs; `Llama.init_weights` uses TinyLlama's scheme."""

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        for name in _POSITIVE_FLOATS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"ModelConfig.dim / n_heads = {self.head_dim} (the head dim) must be even for RoPE; "
                "change dim or n_heads"
            )

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.dim // self.n_heads

    @property
    def _embedding_params(self) -> int:
        """Parameters in one embedding matrix (token embedding or untied output head)."""
        return self.vocab_size * self.dim

    @property
    def num_non_embedding_params(self) -> int:
        """Parameters outside the token embedding and the output head."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = 2 * self.dim * self.dim + 2 * self.dim * kv_dim  # q, o + k, v
        mlp = 3 * self.dim * self.intermediate_size  # gate, up, down
        norms = 2 * self.dim  # input_layernorm, post_attention_layernorm
        return self.n_layers * (attention + mlp + norms) + self.dim  # + final norm

    @property
    def num_params(self) -> int:
        """Total distinct parameters; a tied output head is counted once."""
        n_embedding_matrices = 1 if self.tie_embeddings else 2
        return self.num_non_embedding_params + n_embedding_matrices * self._embedding_params

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token, as in the PaLM / Chinchilla MFU accounting.

        6 FLOPs per weight for every matmul weight, plus 12 * n_layers * dim * seq_len for attention scores.
        The output head is a matmul whether or not it is tied, so it counts; the embedding lookup does not.

        Args:
            seq_len: Tokens per sequence; defaults to `max_seq_len`.

        Returns:
            FLOPs per trained token.
        """
        t = self.max_seq_len if seq_len is None else seq_len
        matmul_params = self.num_non_embedding_params + self._embedding_params  # + output head
        return 6.0 * matmul_params + 12.0 * self.n_layers * self.dim * t

    def to_hf_config_dict(self) -> dict[str, Any]:
        """Keyword arguments for `transformers.LlamaConfig` describing the same model."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": self.init_std,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
        }


PRESETS: dict[str, ModelConfig] = {
    # Unit tests and smoke runs: trains in seconds, every shape distinct enough to catch transposes.
    "debug": ModelConfig(
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=172, max_seq_len=128
    ),
    # `llamita demo`: ~5.4M parameters, trains on a 2-core CPU in minutes.
    "demo": ModelConfig(
        vocab_size=4096,
        dim=256,
        n_layers=6,
        n_heads=8,
        n_kv_heads=4,
        intermediate_size=688,
        max_seq_len=256,
        tie_embeddings=True,
    ),
    # The scaling sweep (`bench/plan_sweep.py`, `llamita plan fit`): four widths and depths that train on the demo
    # corpus in seconds on a GPU; with the sweep's 1024-token vocabulary they have 0.16M, 0.40M, 0.86M and 2.6M
    # parameters, so 0.5-4M training tokens span 0.2 to 25 tokens per parameter.
    "sweep-xs": ModelConfig(
        vocab_size=1024,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=172,
        max_seq_len=256,
        tie_embeddings=True,
    ),  # fmt: skip
    "sweep-s": ModelConfig(
        vocab_size=1024,
        dim=96,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=256,
        max_seq_len=256,
        tie_embeddings=True,
    ),  # fmt: skip
    "sweep-m": ModelConfig(
        vocab_size=1024,
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=344,
        max_seq_len=256,
        tie_embeddings=True,
    ),  # fmt: skip
    "sweep-l": ModelConfig(
        vocab_size=1024,
        dim=192,
        n_layers=6,
        n_heads=6,
        n_kv_heads=3,
        intermediate_size=512,
        max_seq_len=256,
        tie_embeddings=True,
    ),  # fmt: skip
    # TinyLlama's tiny_LLaMA_120M (multi-query attention).
    "tinyllama-120m": ModelConfig(
        vocab_size=32000,
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=1,
        intermediate_size=2048,
        max_seq_len=2048,
    ),
    # TinyLlama-1.1B, as in the paper and its HF config.json.
    "tinyllama-1.1b": ModelConfig(
        vocab_size=32000,
        dim=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        intermediate_size=5632,
        max_seq_len=2048,
        rope_theta=10000.0,
        norm_eps=1e-5,
        tie_embeddings=False,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """Look up a named model preset.

    Args:
        name: One of the keys of `PRESETS`.

    Returns:
        The preset's ModelConfig (frozen; derive variants with `dataclasses.replace`).

    Raises:
        ValueError: If `name` is not a preset; the message lists the valid names.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]
