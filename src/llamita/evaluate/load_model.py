"""Load a model to evaluate: a llamita run directory / checkpoint folder, or a Hugging Face Llama directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llamita.model import Llama
from llamita.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer, and where it came from."""

    model: Llama
    tokenizer: Tokenizer
    source: Path
    """The checkpoint folder, or the Hugging Face directory."""
    step: int | None
    """Training step of a llamita checkpoint; None for a Hugging Face directory."""


def is_hf_directory(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face model directory (it holds config.json) rather than a llamita run."""
    return (Path(path) / "config.json").is_file()


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Model and tokenizer at `path`, on `device`, weights cast to `dtype` (None keeps fp32).

    Args:
        path: A llamita run directory (its latest checkpoint), a ``step_XXXXXXXX`` folder, or a directory holding a
            transformers ``LlamaForCausalLM`` (config.json, safetensors or pytorch_model.bin, tokenizer files).
        device: Where to put the model.
        dtype: Weight dtype; bf16 halves memory and time on a GPU.

    Raises:
        FileNotFoundError, llamita.train.checkpoint.CheckpointError, llamita.interop.HFFormatError: the path is
            neither kind, or a file is missing; the message names it.
    """
    path = Path(path)
    if is_hf_directory(path):
        from llamita.interop import load_init_weights, read_model_config

        with torch.device("meta"):
            model = Llama(read_model_config(path))
        model.to_empty(device=device)
        model.init_weights()  # the RoPE tables; every weight is then overwritten
        load_init_weights(model, path)
        loaded = LoadedModel(model, Tokenizer.load(path), path, None)
    else:
        from llamita.pretrained import load_pretrained

        pre = load_pretrained(path, device)
        loaded = LoadedModel(pre.model, pre.tokenizer, pre.checkpoint, pre.step)
    if dtype is not None:
        loaded.model.to(dtype)
    loaded.model.eval()
    return loaded
