"""Validation loss and perplexity of a model on held-out token shards."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llamita.data.loader import eval_batches


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    shards: list[Path],
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the first `max_batches` batches of `shards`.

    Every window is scored in full (no sliding context), so the number is comparable across runs that use
    the same `seq_len`. Under torch.distributed each rank scores its stride of windows and the sums are
    reduced, so the result does not depend on the number of ranks.

    Returns:
        {"val_loss": nats/token, "val_ppl": exp(val_loss), "val_tokens": tokens scored}.
    """
    model.eval()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, tokens]
    batches = eval_batches(
        shards,
        seq_len,
        batch_size,
        max_batches=max_batches,
        rank=rank,
        world_size=world,
        vocab_size=vocab_size,
    )
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast or contextlib.nullcontext():
            logits = model(inputs)  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        total[0] += loss.double()
        total[1] += targets.numel()
    if world > 1:
        dist.all_reduce(total)
    loss_sum, tokens = total.tolist()
    if tokens == 0:
        raise ValueError(
            f"no validation windows of {seq_len + 1} tokens in {len(shards)} shard(s); "
            "prepare with a larger val fraction or lower the sequence length"
        )
    mean = loss_sum / tokens
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)), "val_tokens": int(tokens)}
