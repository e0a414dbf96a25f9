"""Initialise a built model from pretrained weights: a Hugging Face Llama directory or a llamita checkpoint.

For continual pretraining (`pretrain --init.from PATH`): weights only, one tensor at a time; the optimizer,
schedule and data order start fresh.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from llamita.interop.checkpoint_io import WeightSource, open_checkpoint
from llamita.interop.hf import HFWeights
from llamita.model import Llama, ModelConfig

IGNORED_FIELDS = ("max_seq_len", "init_std")
"""ModelConfig fields that shape no weight: the RoPE table length and the initialisation scale may differ."""


def open_weights(path: str | Path, *, verify: bool = True) -> WeightSource:
    """The weights at `path`: a Hugging Face directory (has config.json) or a llamita run / checkpoint folder.

    A llamita checkpoint is checked against its checksums first unless `verify` is off, and a LoRA run's adapters
    are merged into its base weights (`open_checkpoint`).

    Raises:
        llamita.train.checkpoint.CheckpointError: `path` is neither, or an incomplete checkpoint.
        llamita.interop.hf.HFFormatError: an HF directory llamita cannot read (the message names the field).
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return HFWeights(path)
    return open_checkpoint(path, verify=verify)


def read_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of the weights at `path` (see `open_weights`), to build a model that `load_init_weights` fits."""
    return open_weights(path, verify=False).model_config  # the weights are verified when they are loaded


def config_differences(expected: ModelConfig, found: ModelConfig) -> list[str]:
    """``field: ours != theirs`` for every weight-shaping field in which two configs differ."""
    return [
        f"{f.name}: {getattr(expected, f.name)!r} != {getattr(found, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in IGNORED_FIELDS and getattr(expected, f.name) != getattr(found, f.name)
    ]


@torch.no_grad()
def load_init_weights(model: Llama, path: str | Path) -> ModelConfig:
    """Copy pretrained weights into an already-built, unsharded `model`, one tensor at a time.

    The source's config must match `model.config` in every field that shapes or uses a weight (all but
    `IGNORED_FIELDS`); tensors are converted to the model's dtype and device.

    Args:
        model: a materialised Llama (not on the meta device, not yet sharded).
        path: a Hugging Face Llama directory, a llamita run directory or a checkpoint folder.

    Returns:
        The source's ModelConfig.

    Raises:
        ValueError: the configs differ; the message lists each differing field with both values.
        llamita.train.checkpoint.CheckpointError, llamita.interop.hf.HFFormatError: see `open_weights`.
    """
    source = open_weights(path)
    diff = config_differences(model.config, source.model_config)
    if diff:
        raise ValueError(
            f"{path}: the weights are for another architecture than this run's model ({'; '.join(diff)}); "
            "set the run's model config to match (llamita.interop.read_model_config reads it)"
        )
    targets = model.state_dict()  # tensors sharing the parameters' storage; a tied head is the embedding
    for name in source.names:
        targets[name].copy_(source.load(name))
    return source.model_config
