"""The preference-tuning objective the trainer runs: tree-packed pairs -> both answers' log-probs in one forward
pass -> a preference loss against the reference -> loss and metrics; and the same over a held-out set.

The trainer calls `loss(model, batch)` in every micro-step, `count(batch)` to weight micro-batches by their pairs
(a step's loss is the mean over its pairs on every rank), and `validate` on the held-out pairs. The reference is
either the stored log-probs of every pair (`chat.reference_logps`, computed once before training: one model in
memory) or a live frozen model run on each batch.

Shapes: B rows, T slots, N scored tokens, n pairs, P all pairs of the run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from llamita.chat.packing import TreeBatch, TreeRows
from llamita.chat.preference_loss import METRICS, PreferenceLoss, pair_metrics


def pair_logps(model: nn.Module, batch: TreeBatch) -> Tensor:
    """Summed log-probabilities of each pair's chosen and rejected answer, from one forward pass over the trees.

    Only the answer positions go through the output head (`Llama.forward(..., predict=...)`).

    Returns:
        [n, 2] fp32 (chosen, rejected).
    """
    token_logps = model(
        batch.inputs, targets=batch.targets, positions=batch.positions, branches=batch.branches, predict=batch.predict
    )  # [N]
    n = batch.pair_ids.numel()
    sums = torch.zeros(2 * n, dtype=token_logps.dtype, device=token_logps.device)  # [2n]
    return sums.index_add(0, batch.sequence, token_logps).view(n, 2)  # [n, 2]


class PreferenceObjective:
    """A preference loss (`chat.preference_loss`) on tree-packed pairs, for `train.trainer.Trainer`.

    Args:
        loss: the loss and its settings.
        reference: [P, 2] the reference log-probs of every pair by id, on the device (precomputed); a frozen
            model (live; under no_grad, in eval mode); or None for a reference-free loss.
    """

    def __init__(self, loss: PreferenceLoss, reference: Tensor | nn.Module | None) -> None:
        if loss.needs_reference and reference is None:
            raise ValueError(f"the {loss.loss!r} loss needs a reference: stored log-probs or a frozen model")
        self.preference_loss = loss
        self.reference = reference if loss.needs_reference else None

    def reference_logps(self, batch: TreeBatch) -> Tensor | None:
        """[n, 2] the reference's log-probs of the batch's pairs; None for a reference-free loss."""
        if self.reference is None:
            return None
        if isinstance(self.reference, Tensor):
            return self.reference.index_select(0, batch.pair_ids)  # [n, 2]
        with torch.no_grad():
            return pair_logps(self.reference, batch)

    def loss(self, model: nn.Module, batch: Iterable[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss over the batch's pairs, and their mean rewards, margins, accuracy and log-probs."""
        tree = TreeBatch(*batch)
        logps = pair_logps(model, tree)  # [n, 2]
        losses, rewards = self.preference_loss(logps, self.reference_logps(tree), tree.lengths)  # [n], [n, 2]
        return losses.mean(), pair_metrics(rewards, logps)

    def count(self, batch: Iterable[Tensor]) -> int:
        """Pairs in a (host) micro-batch: what the loss averages over."""
        return TreeBatch(*batch).pair_ids.numel()

    @torch.no_grad()
    def validate(
        self,
        model: nn.Module,
        batches: Iterable[tuple[Tensor, ...]],
        *,
        device: torch.device,
        autocast: contextlib.AbstractContextManager | None = None,
    ) -> dict[str, float]:
        """Mean loss and metrics over every held-out pair of `batches`, summed over ranks.

        Returns:
            {"val_loss", "val_rewards/chosen", ..., "val_pairs"}; NaN means when no batch held a pair.
        """
        model.eval()
        names = ("loss", *METRICS)
        totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)  # [k + 1]: weighted sums, pairs
        for batch in batches:
            tree = TreeBatch(*(t.to(device) for t in batch))
            with autocast or contextlib.nullcontext():
                loss, metrics = self.loss(model, tree)
            n = tree.pair_ids.numel()
            if n:  # a padding batch (`PackedValidation`) holds no pair: its means are NaN and weigh nothing
                totals[:-1] += torch.stack([loss, *(metrics[k] for k in METRICS)]).double() * n
                totals[-1] += n
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        *sums, n_pairs = totals.tolist()
        means = [x / n_pairs for x in sums] if n_pairs else [math.nan] * len(names)
        return {**{f"val_{k}": v for k, v in zip(names, means)}, "val_pairs": int(n_pairs)}


@torch.no_grad()
def preference_accuracy(
    model: nn.Module,
    rows: TreeRows,
    *,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> float:
    """Share of the pairs of `rows` whose chosen answer `model` finds likelier than the rejected one (by summed
    log-probs): a model's own preference, comparable before and after tuning (unlike `rewards/accuracies`, which
    is 0 for the reference itself, whose rewards are all 0)."""
    was_training = model.training
    model.eval()
    wins = total = 0
    for start in range(0, len(rows), batch_size):
        batch = TreeBatch(*(t.to(device) for t in rows.batch(np.arange(start, min(start + batch_size, len(rows))))))
        with autocast or contextlib.nullcontext():
            logps = pair_logps(model, batch)  # [n, 2]
        wins += int((logps[:, 0] > logps[:, 1]).sum())
        total += len(logps)
    model.train(was_training)
    return wins / max(1, total)
