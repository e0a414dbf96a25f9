"""Preference losses as plain tensor formulas, each named by its paper, and the rewards logged with them.

Inputs are per pair: the policy's and the reference's summed log-probabilities of the chosen (y_w) and rejected
(y_l) completions given the prompt x, and the completions' token counts. With the log-ratios
``r_w = log pi(y_w|x) - log pi_ref(y_w|x)`` and ``r_l`` alike, and ``delta = r_w - r_l``, as TRL's DPOTrainer
computes them:

- ``sigmoid`` -- DPO (Rafailov et al. 2023, "Direct Preference Optimization"): ``-log sigmoid(beta * delta)``; with
  label smoothing eps, conservative DPO (cDPO, Mitchell 2023): ``-(1 - eps) log sigmoid(beta delta) - eps log
  sigmoid(-beta delta)``, TRL's ``sigmoid`` with ``label_smoothing`` before 1.0.
- ``ipo`` -- IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", eq. 17): ``(delta_avg - 1 / (2 beta))^2`` with each log-ratio divided by its completion's length,
  as TRL does (and as the IPO authors confirmed to TRL their results were computed).
- ``hinge`` -- SLiC (Zhao et al. 2023, "SLiC-HF"): ``relu(1 - beta * delta)``.
- ``simpo`` -- SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"):
  no reference; the reward is ``beta * mean log pi(y|x)`` per token, and the loss ``-log sigmoid(reward_w -
  reward_l - gamma)`` with target margin gamma (label smoothing as in cDPO), TRL's CPOTrainer ``simpo`` with
  ``cpo_alpha=0``.

Rewards (the metrics ``rewards/chosen`` and ``rewards/rejected``) are ``beta * r_w`` and ``beta * r_l``; SimPO's are
its own length-normalised rewards. ``rewards/margins`` is their difference, ``rewards/accuracies`` the share of pairs
whose chosen reward is the higher.

Shapes: n pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
REFERENCE_FREE = ("simpo",)
"""Losses that need no reference model (nor reference log-probs)."""


def dpo_sigmoid(delta: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023), conservative with `label_smoothing` (cDPO): [n] losses from [n] log-ratio gaps."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def ipo(delta_per_token: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): [n] losses from [n] gaps of length-normalised log-ratios; beta is tau."""
    return (delta_per_token - 1 / (2 * beta)) ** 2


def slic_hinge(delta: Tensor, beta: float) -> Tensor:
    """SLiC's hinge loss (Zhao et al. 2023) on the DPO log-ratio gap: [n] losses."""
    return torch.relu(1 - beta * delta)


def simpo(chosen_reward: Tensor, rejected_reward: Tensor, gamma: float, label_smoothing: float = 0.0) -> Tensor:
    """SimPO (Meng et al. 2024): [n] losses from [n] length-normalised rewards beta * mean log pi(y|x)."""
    margin = chosen_reward - rejected_reward - gamma
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


@dataclass(frozen=True)
class PreferenceLoss:
    """One of :data:`LOSSES` with its settings (the `dpo` config section's)."""

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown preference loss {self.loss!r}; expected one of {', '.join(LOSSES)}")

    @classmethod
    def of(cls, section: Any) -> PreferenceLoss:
        """From the `dpo` config section."""
        return cls(section.loss, section.beta, section.label_smoothing, section.simpo_gamma)

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE

    def __call__(self, logps: Tensor, ref_logps: Tensor | None, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Per-pair losses and rewards.

        Args:
            logps: [n, 2] the policy's summed log-probabilities of (chosen, rejected).
            ref_logps: [n, 2] the reference's; None for a reference-free loss.
            lengths: [n, 2] the completions' token counts.

        Returns:
            ([n] losses, [n, 2] rewards of chosen and rejected).
        """
        if self.loss == "simpo":
            rewards = self.beta * logps / lengths.clamp(min=1)  # [n, 2]
            return simpo(rewards[:, 0], rewards[:, 1], self.simpo_gamma, self.label_smoothing), rewards
        if ref_logps is None:
            raise ValueError(f"the {self.loss!r} loss needs the reference log-probabilities")
        ratios = logps - ref_logps  # [n, 2]
        delta = ratios[:, 0] - ratios[:, 1]  # [n]
        if self.loss == "sigmoid":
            losses = dpo_sigmoid(delta, self.beta, self.label_smoothing)
        elif self.loss == "ipo":
            per_token = ratios / lengths.clamp(min=1)  # [n, 2]
            losses = ipo(per_token[:, 0] - per_token[:, 1], self.beta)
        else:
            losses = slic_hinge(delta, self.beta)
        return losses, self.beta * ratios.detach()


METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
"""What `pair_metrics` returns, named as TRL logs them."""


def pair_metrics(rewards: Tensor, logps: Tensor) -> dict[str, Tensor]:
    """Means over the pairs of :data:`METRICS`: rewards/{chosen, rejected, margins, accuracies} and
    logps/{chosen, rejected}.

    Args:
        rewards: [n, 2] (chosen, rejected), as `PreferenceLoss` returns them.
        logps: [n, 2] the policy's summed log-probabilities.

    Returns:
        Device scalars.
    """
    rewards, logps = rewards.detach().float(), logps.detach().float()
    return {
        "rewards/chosen": rewards[:, 0].mean(),
        "rewards/rejected": rewards[:, 1].mean(),
        "rewards/margins": (rewards[:, 0] - rewards[:, 1]).mean(),
        "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).float().mean(),
        "logps/chosen": logps[:, 0].mean(),
        "logps/rejected": logps[:, 1].mean(),
    }
