"""Packing: rows with document boundaries give the loss and gradients of the same conversations unpacked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamita.chat.packing import IGNORE, Example, PackedLoader, PackedValidation, fit_length, pack, truncate_at_turn
from llamita.model import Llama, ModelConfig

TINY = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48, max_seq_len=64)


def _example(rng: np.random.Generator, n: int) -> Example:
    ids = tuple(int(i) for i in rng.integers(3, TINY.vocab_size, n))
    # prompt, then an answer, then a second prompt and answer: two trained turns
    cut = sorted(rng.choice(np.arange(1, n), size=3, replace=False))
    trainable = tuple(cut[0] <= t < cut[1] or t >= cut[2] for t in range(n))
    return Example(ids, trainable, f"conv{n}")


def test_targets_are_the_trained_next_tokens_and_padding_carries_no_loss():
    ex = Example((5, 6, 7, 8, 9), (False, False, True, True, False))
    rows, stats = pack([ex], 8, pad_id=0)
    assert rows.inputs[0].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert rows.targets[0].tolist() == [IGNORE, 7, 8, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]
    assert rows.positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert (stats.rows, stats.tokens, stats.trained_tokens) == (1, 5, 2)


def test_best_fit_decreasing_and_over_length():
    rng = np.random.default_rng(0)
    examples = [_example(rng, n) for n in (40, 30, 20, 10, 25, 70)]
    with pytest.raises(ValueError, match="longer than 64 tokens, e.g. conv70"):
        pack(examples, 64, pad_id=0)
    assert fit_length(examples[-1], 64, "drop") is None
    rows, stats = pack(examples[:-1], 64, pad_id=0)
    assert stats.conversations == 5
    # Best fit, longest first: 40 | 30 | 25 joins 30 (9 left) | 20 joins 40 (4 left) | 10 fits neither
    assert stats.rows == 3 and stats.efficiency(64) == pytest.approx(125 / 192)
    assert rows.positions[0].tolist()[:61] == [*range(40), *range(20), 0]
    long = examples[-1]
    assert fit_length(long, 64, "truncate") == truncate_at_turn(long, 64)
    cut = truncate_at_turn(long, 64)
    assert cut is not None and len(cut) <= 64 and cut.trainable[-1] and cut.ids == long.ids[: len(cut)]
    assert len(pack(examples[:3], 64, pad_id=0, packing=False)[0]) == 3


def test_packed_loss_and_gradients_equal_unpacked():
    torch.manual_seed(0)
    model = Llama(TINY).double()
    rng = np.random.default_rng(1)
    examples = [_example(rng, n) for n in (30, 20, 12, 9)]
    rows, stats = pack(examples, 64, pad_id=0)
    assert stats.rows == 2
    inputs, targets, positions = (torch.from_numpy(a) for a in (rows.inputs, rows.targets, rows.positions))
    loss = model(inputs, targets=targets, positions=positions)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # Unpacked: each conversation alone, its loss summed over its trained targets, all divided by their total.
    total, n = 0.0, 0
    for ex in examples:
        one, _ = pack([ex], len(ex), pad_id=0)
        t = torch.from_numpy(one.targets)
        count = int((t != IGNORE).sum())
        total = total + model(torch.from_numpy(one.inputs), targets=t) * count
        n += count
    reference = total / n
    # The chunked loss computes in fp32 whatever the model's dtype: fp32 tolerance.
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)
    for got, want in zip(grads, torch.autograd.grad(reference, list(model.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _rows(n: int):
    rng = np.random.default_rng(2)
    return pack([_example(rng, int(k)) for k in rng.integers(8, 30, n)], 32, pad_id=0, packing=False)[0]


def test_loader_epochs_shuffle_and_resume_mid_epoch_exactly():
    rows = _rows(10)
    loader = PackedLoader(rows, micro_batch=2, global_batch=4, seed=3)
    it = iter(loader)
    first = [next(it) for _ in range(2 * 7)]  # 7 steps = 28 rows: 2.8 epochs
    seen = np.concatenate([b[0].numpy() for b in first])
    for epoch in range(2):  # every row once per epoch, in another order each epoch
        got = seen[epoch * 10 : (epoch + 1) * 10]
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, rows.inputs.tolist()))
    assert not np.array_equal(seen[:10], seen[10:20])
    # Resume after step 3 (mid-epoch): the next batches are those of the uninterrupted loader.
    loader = PackedLoader(rows, micro_batch=2, global_batch=4, seed=3)
    it = iter(loader)
    for _ in range(2 * 3):
        next(it)
    state = loader.state_dict()
    resumed = PackedLoader(rows, micro_batch=2, global_batch=4, seed=3)
    resumed.load_state_dict(state)
    again = iter(resumed)
    for want in first[6:]:
        for a, b in zip(next(again), want):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="packed rows differ"):
        PackedLoader(_rows(11), micro_batch=2, global_batch=4, seed=3).load_state_dict(state)


def test_two_ranks_split_each_step_between_them():
    rows = _rows(12)
    one = iter(PackedLoader(rows, micro_batch=2, global_batch=4, seed=0))
    ranks = [iter(PackedLoader(rows, micro_batch=1, global_batch=4, rank=r, world_size=2, seed=0)) for r in (0, 1)]
    for _ in range(3):
        whole = torch.cat([next(one)[0] for _ in range(2)])
        split = [[next(it)[0] for _ in range(2)] for it in ranks]  # 2 micro-batches of 1 row per rank
        got = torch.cat([split[r][m] for m in range(2) for r in (0, 1)])
        assert torch.equal(got, whole)
    val = PackedValidation(rows)
    assert sum(len(b[0]) for r in (0, 1) for b in val.batches(4, None, r, 2)) == 12


def test_flex_block_mask_gives_the_dense_masks_logits():
    """GPUs attend packed rows through FlexAttention's BlockMask; it must compute what the dense mask does."""
    from llamita.model.llama import document_mask

    torch.manual_seed(0)
    model = Llama(TINY)
    rng = np.random.default_rng(4)
    rows, _ = pack([_example(rng, n) for n in (30, 20, 12, 9)], 64, pad_id=0)
    inputs, positions = torch.from_numpy(rows.inputs), torch.from_numpy(rows.positions)
    with torch.no_grad():  # FlexAttention has no CPU backward (the GPU benchmark trains through it)
        dense = model.hidden_states(inputs, positions=positions, mask=document_mask(positions, blocks=False))
        blocks = model.hidden_states(inputs, positions=positions, mask=document_mask(positions, blocks=True))
    torch.testing.assert_close(blocks, dense, rtol=1e-4, atol=1e-5)
