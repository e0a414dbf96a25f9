"""Preference losses: loss, rewards and gradients of each loss type equal a float64 reference computed from
transformers' log-probs of the same pairs with TRL's formulas (written out here), and TRL's own DPOTrainer loss on
the same batch when trl is installed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from preference_data import TINY, hf_pair_logps, hf_twin, random_pairs

from llamita.chat.packing import Pair, pack_pairs
from llamita.chat.preference_loss import PreferenceLoss
from llamita.chat.preference_objective import PreferenceObjective
from llamita.model import Llama

BETA, GAMMA = 0.5, 0.3


def trl_formulas(loss: str, eps: float, logps: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor):
    """TRL's losses and rewards (DPOTrainer._compute_loss, CPOTrainer.cpo_loss for simpo), from [n, 2] log-probs."""
    if loss == "simpo":
        average = logps / lengths  # CPOTrainer: average_log_prob for simpo
        logits = average[:, 0] - average[:, 1] - GAMMA / BETA
        losses = -F.logsigmoid(BETA * logits) * (1 - eps) - F.logsigmoid(-BETA * logits) * eps
        return losses.mean(), BETA * average
    chosen, rejected = logps[:, 0] - ref[:, 0], logps[:, 1] - ref[:, 1]
    delta = chosen - rejected
    if loss == "sigmoid":  # with label_smoothing: cDPO, TRL's sigmoid before 1.0
        losses = -F.logsigmoid(BETA * delta) * (1 - eps) - F.logsigmoid(-BETA * delta) * eps
    elif loss == "hinge":
        losses = torch.relu(1 - BETA * delta)
    else:  # ipo, per completion token
        losses = (chosen / lengths[:, 0] - rejected / lengths[:, 1] - 1 / (2 * BETA)) ** 2
    return losses.mean(), BETA * torch.stack([chosen, rejected], dim=1)


@pytest.mark.parametrize(
    ("loss", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0), ("simpo", 0.1)]
)
def test_loss_rewards_and_gradients_equal_trls_formulas_on_transformers_log_probs(loss, eps):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    policy, reference = Llama(TINY).double(), Llama(TINY).double()  # two random models: log-ratios far from 0
    pairs = random_pairs(np.random.default_rng(5), 10)
    rows, _ = pack_pairs(pairs, 96, pad_id=0)
    batch = rows.batch(np.arange(len(rows)))
    with torch.no_grad():
        table, _ = hf_pair_logps(hf_twin(reference), pairs)  # [P, 2] by pair id
    objective = PreferenceObjective(PreferenceLoss(loss, BETA, eps, GAMMA), table)
    ours, metrics = objective.loss(policy, batch)
    ours.backward()

    hf = hf_twin(policy)
    order = batch.pair_ids.tolist()
    logps, lengths = hf_pair_logps(hf, [pairs[i] for i in order])
    want, rewards = trl_formulas(loss, eps, logps, table[order], lengths.double())
    want.backward()
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-12)
    rewards = rewards.detach()
    expected = {
        "rewards/chosen": rewards[:, 0].mean(),
        "rewards/rejected": rewards[:, 1].mean(),
        "rewards/margins": (rewards[:, 0] - rewards[:, 1]).mean(),
        "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).double().mean(),
        "logps/chosen": logps[:, 0].detach().mean(),
        "logps/rejected": logps[:, 1].detach().mean(),
    }
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name].double(), value, rtol=1e-6, atol=1e-6, msg=name)
    assert 0 < float(metrics["rewards/accuracies"]) < 1  # the pairs are not all on one side
    # RMSNorm runs in fp32 in both models, so float64 gradients agree to about fp32's rounding of the activations.
    for name, param in policy.named_parameters():
        torch.testing.assert_close(param.grad, hf.get_parameter(name).grad, rtol=1e-6, atol=1e-7, msg=name)


def test_the_reference_free_loss_needs_no_reference_and_the_others_do():
    assert PreferenceObjective(PreferenceLoss("simpo"), None).reference is None
    with pytest.raises(ValueError, match="needs a reference"):
        PreferenceObjective(PreferenceLoss("sigmoid"), None)
    with pytest.raises(ValueError, match="unknown preference loss"):
        PreferenceLoss("kto")


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_trls_dpo_trainer_computes_the_same_loss_on_the_same_batch(loss, prepared, tmp_path):
    """The cross-check: TRL's DPOTrainer (its tokenization, collation, live reference model and loss) on a batch;
    ours on the same token ids."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(prepared["tokenizer"])
    config = dataclasses.replace(TINY, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    policy, reference = Llama(config), Llama(config)
    records = [
        {"prompt": f"Document {i}. the model", "chosen": f" data train loss {i}", "rejected": f" {i + 3} value list"}
        for i in range(6)
    ]
    args = DPOConfig(
        output_dir=str(tmp_path), beta=BETA, loss_type=[loss], per_device_train_batch_size=6, max_length=None,
        report_to=[], use_cpu=True, bf16=False,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=hf_twin(policy, torch.float32),
        ref_model=hf_twin(reference, torch.float32),
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
    )
    examples = [trainer.train_dataset[i] for i in range(len(records))]
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model.eval(), trainer.data_collator(examples))
        pairs = [Pair(tuple(e["prompt_ids"]), tuple(e["chosen_ids"]), tuple(e["rejected_ids"]), i)
                 for i, e in enumerate(examples)]  # fmt: skip
        rows, _ = pack_pairs(pairs, 96, pad_id=0)
        batch = rows.batch(np.arange(len(rows)))
        table, _ = hf_pair_logps(hf_twin(reference, torch.float32), pairs)
        ours, _ = PreferenceObjective(PreferenceLoss(loss, BETA), table).loss(policy.eval(), batch)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)
