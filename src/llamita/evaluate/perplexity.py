"""Perplexity: validation loss on held-out token shards, and loss / bits-per-byte on raw text files.

Shards are scored in fixed windows (`validation_loss`), comparable across runs of one sequence length. Text files
are scored as lm-evaluation-harness's ``loglikelihood_rolling`` scores a document (`text_perplexity`): every token
once, after BOS, in consecutive windows of the model's max_seq_len, so the number depends only on the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llamita.config import ConfigError
from llamita.data.loader import eval_batches
from llamita.data.sources import SourceError, iter_documents
from llamita.evaluate.scoring import rolling_windows, score_pairs
from llamita.model.llama import Llama
from llamita.tokenizer import Tokenizer


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    *,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """Mean next-token cross-entropy over every target of `batches` that is not -100, summed over ranks.

    Args:
        model: the language model (put in eval mode; the caller restores its mode).
        batches: (inputs, targets) or (inputs, targets, positions) [B, T] batches, as the training loaders yield
            them; positions mark packed documents (`Llama.forward`).
        device: where the model is.
        autocast: the forward passes' autocast context, if any.

    Returns:
        {"val_loss": nats/token, "val_ppl": exp(val_loss), "val_tokens": tokens scored}; `val_tokens` 0 (and a
        NaN loss) when no batch held a target.
    """
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, tokens]
    for batch in batches:
        inputs, targets, *positions = (t.to(device) for t in batch)
        with autocast or contextlib.nullcontext():
            logits = model(inputs, positions=positions[0] if positions else None)  # [B, T, V]
        total[0] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").double()
        total[1] += (targets != -100).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    loss_sum, tokens = total.tolist()
    mean = loss_sum / tokens if tokens else math.nan
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)), "val_tokens": int(tokens)}


@dataclass(frozen=True)
class ShardValidation:
    """Held-out token shards scored in full windows of `seq_len` (pretraining's validation set).

    Every window is scored in full (no sliding context), so the number is comparable across runs that use the same
    `seq_len`. Under torch.distributed rank r scores windows r, r + world, ..., so the result does not depend on the
    number of ranks.
    """

    shards: list[Path]
    seq_len: int
    vocab_size: int | None = None
    """The shards' tokenizer vocabulary (the model's may exceed it: padding), checked while reading."""

    def batches(self, batch_size: int, max_batches: int | None, rank: int, world: int) -> Iterator:
        return eval_batches(
            self.shards,
            self.seq_len,
            batch_size,
            max_batches=max_batches,
            rank=rank,
            world_size=world,
            vocab_size=self.vocab_size,
        )


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
    """Token-weighted mean cross-entropy over the first `max_batches` batches of `shards` (see `ShardValidation`).

    Returns:
        {"val_loss": nats/token, "val_ppl": exp(val_loss), "val_tokens": tokens scored}.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    batches = ShardValidation(shards, seq_len, vocab_size).batches(batch_size, max_batches, rank, world)
    result = mean_loss(model, batches, device=device, autocast=autocast)
    if result["val_tokens"] == 0:
        raise ConfigError(
            f"no validation windows of {seq_len + 1} tokens in {len(shards)} shard(s); "
            "prepare with a larger val fraction or lower the sequence length"
        )
    return result


def text_perplexity(
    model: Llama,
    tokenizer: Tokenizer,
    files: list[Path],
    *,
    batch_size: int,
    text_field: str = "text",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float | int]:
    """Loss, perplexity and bits per byte of raw text, each document scored whole in rolling windows.

    A document is a ``.txt[.gz|.zst]`` file, or one record of a ``.jsonl[.gz|.zst]`` / ``.parquet`` file
    (`text_field`).
    Its tokens (no BOS) are predicted once each, the first after BOS, in lm-eval's ``loglikelihood_rolling``
    windows of the model's max_seq_len (`llamita.evaluate.scoring.rolling_windows`). Bits per byte = total NLL /
    (ln 2 * UTF-8 bytes of the text), which, unlike loss per token, compares models with different tokenizers.

    Returns:
        {"text_loss": nats/token, "text_ppl", "text_bits_per_byte", "text_tokens", "text_bytes", "text_documents"}.

    Raises:
        llamita.data.sources.SourceError: a file cannot be read.
        llamita.data.sources.SourceError: the files hold no text.
    """
    max_len = model.config.max_seq_len
    pairs, n_tokens, n_bytes, n_docs = [], 0, 0, 0
    for path in files:
        for text in iter_documents(Path(path), text_field):
            tokens = tokenizer.encode(text)
            pairs.extend(rolling_windows(tokens, tokenizer.bos_id, max_len))
            n_tokens += len(tokens)
            n_bytes += len(text.encode("utf-8"))
            n_docs += 1
    if not n_tokens:
        raise SourceError(f"no text in {', '.join(map(str, files))}; pass .txt, .jsonl or .parquet files with text")
    was_training = model.training
    model.eval()
    try:
        scores = score_pairs(model, pairs, batch_size=batch_size, autocast_dtype=autocast_dtype)
    finally:
        model.train(was_training)
    nll = -sum(lp for lp, _ in scores)
    loss = nll / n_tokens
    return {
        "text_loss": loss,
        "text_ppl": math.exp(min(loss, 50.0)),
        "text_bits_per_byte": nll / (math.log(2) * n_bytes),
        "text_tokens": n_tokens,
        "text_bytes": n_bytes,
        "text_documents": n_docs,
    }
