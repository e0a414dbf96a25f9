"""Grow a model's vocabulary for new tokens: the new rows start at the mean of the old ones."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llamita.model.llama import Llama


@torch.no_grad()
def resize_token_embeddings(model: Llama, vocab_size: int) -> int:
    """Give ``model`` ``vocab_size`` token rows: new rows of ``embed_tokens`` (and of ``lm_head`` when untied)
    are the mean of the old rows, so a new token starts as an average token, not a random one.

    Call it before parallelizing; ``model.config.vocab_size`` follows. A model with that many rows or more (a
    padded vocabulary) is left as it is.

    Returns:
        The number of rows added.
    """
    old = model.config.vocab_size
    if vocab_size <= old:
        return 0
    embed = model.model.embed_tokens
    embed.weight = _grown(embed.weight, vocab_size)
    embed.num_embeddings = vocab_size
    if model.config.tie_embeddings:
        model.lm_head.weight = embed.weight
    else:
        model.lm_head.weight = _grown(model.lm_head.weight, vocab_size)
    model.lm_head.out_features = vocab_size
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)
    return vocab_size - old


def _grown(weight: nn.Parameter, rows: int) -> nn.Parameter:
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # [1, D]
    grown = torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])  # [rows, D]
    return nn.Parameter(grown, requires_grad=weight.requires_grad)
