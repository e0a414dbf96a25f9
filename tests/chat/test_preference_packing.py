"""Preference trees: one forward pass over packed prompt + chosen + rejected trees gives the log-probs of the two
separate full sequences, as transformers computes them; truncation as TRL's; the loader serves trees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from preference_data import TINY, hf_pair_logps, hf_twin, random_pairs

from llamita.chat.packing import IGNORE, PackedLoader, PackedValidation, Pair, TreeBatch, fit_pair, pack_pairs
from llamita.chat.preference_objective import pair_logps
from llamita.model import Llama


def test_a_pair_is_its_prompt_then_two_branches_at_their_own_positions():
    pair = Pair((1, 2, 3), (4, 5), (6, 7, 8), id=0)
    assert len(pair) == 2 + 2 + 3
    rows, stats = pack_pairs([pair], 10, pad_id=0)
    # x[:-1] | x[-1] y_w[:-1] | x[-1] y_l[:-1] | padding: each completion token predicted at its own position
    assert rows.inputs[0].tolist() == [1, 2, 3, 4, 3, 6, 7, 0, 0, 0]
    assert rows.targets[0].tolist() == [IGNORE, IGNORE, 4, 5, 6, 7, 8, IGNORE, IGNORE, IGNORE]
    assert rows.positions[0].tolist() == [0, 1, 2, 3, 2, 3, 4, 0, 1, 2]
    assert rows.branches[0].tolist() == [0, 0, 1, 1, 2, 2, 2, 0, 0, 0]
    assert rows.pairs[0].tolist() == [0] * 7 + [-1] * 3
    assert (stats.rows, stats.tokens, stats.trained_tokens) == (1, 7, 5)
    batch = rows.batch(np.array([0]))
    assert batch.predict.tolist() == [2, 3, 4, 5, 6]
    assert batch.sequence.tolist() == [0, 0, 1, 1, 1] and batch.lengths.tolist() == [[2, 3]]
    with pytest.raises(ValueError, match="longer than 6 tokens, e.g. p"):
        pack_pairs([Pair((1, 2, 3), (4, 5), (6, 7, 8), id=0, source="p")], 6, pad_id=0)
    with pytest.raises(ValueError, match="prompt under 2 tokens"):
        pack_pairs([Pair((1,), (4,), (6,), id=0)], 6, pad_id=0)


def test_one_forward_pass_gives_the_log_probs_of_the_separate_sequences():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Llama(TINY).eval()
    pairs = random_pairs(np.random.default_rng(1), 12)
    rows, stats = pack_pairs(pairs, 96, pad_id=0)
    assert stats.rows < len(pairs)  # several trees share a row
    # Row 0 twice in one batch (an epoch's end and the next one's start): its pairs count twice, each whole.
    index = np.array([0, *range(len(rows)), 0])
    batch = rows.batch(index)
    with torch.no_grad():
        ours = pair_logps(model, batch)  # [n, 2]
        want, lengths = hf_pair_logps(hf_twin(model, torch.float32), [pairs[i] for i in batch.pair_ids.tolist()])
    assert batch.pair_ids.numel() == len(pairs) + 2 * len(np.unique(rows.pairs[0][rows.pairs[0] >= 0]))
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(batch.lengths, lengths)


def test_flex_block_mask_with_branches_gives_the_dense_masks_hidden_states():
    """GPUs attend the trees through FlexAttention's BlockMask; it must compute what the dense tree mask does."""
    from llamita.model.llama import document_mask

    torch.manual_seed(0)
    model = Llama(TINY)
    rows, _ = pack_pairs(random_pairs(np.random.default_rng(2), 8), 96, pad_id=0)
    tree = TreeBatch(*rows.batch(np.arange(len(rows))))
    with torch.no_grad():  # FlexAttention has no CPU backward (the GPU trains through it)
        masks = [document_mask(tree.positions, tree.branches, blocks=b) for b in (False, True)]
        dense, blocks = (model.hidden_states(tree.inputs, positions=tree.positions, mask=m) for m in masks)
    torch.testing.assert_close(blocks, dense, rtol=1e-4, atol=1e-5)


def test_fit_pair_truncates_as_trl_does():
    pair = Pair(tuple(range(10)), tuple(range(20, 26)), tuple(range(30, 33)), id=0)
    assert fit_pair(pair, 16, 8, "truncate") is pair  # 10 + 6 fits
    assert fit_pair(pair, 15, 8, "drop") is None
    # The prompt's end first (keep_end); the answers are only cut when that is not enough.
    assert fit_pair(pair, 15, 8, "truncate") == Pair(tuple(range(2, 10)), pair.chosen, pair.rejected, id=0)
    cut = fit_pair(pair, 12, 8, "truncate")
    assert cut == Pair(tuple(range(2, 10)), tuple(range(20, 24)), tuple(range(30, 33)), id=0)


def test_loader_and_validation_serve_trees_and_count_pairs():
    from llamita.chat.preference_loss import PreferenceLoss
    from llamita.chat.preference_objective import PreferenceObjective

    rows, stats = pack_pairs(random_pairs(np.random.default_rng(3), 10), 64, pad_id=0)
    objective = PreferenceObjective(PreferenceLoss(), torch.zeros(10, 2))
    batches = iter(PackedLoader(rows, micro_batch=1, global_batch=1, seed=0))
    assert sum(objective.count(next(batches)) for _ in range(len(rows))) == 10  # one epoch: every pair once
    val = PackedValidation(rows)
    assert sum(objective.count(b) for b in val.batches(3, None, 0, 1)) == stats.conversations == 10
    # On 3 ranks (rows r, r + 3, ...) every pair once; a rank short of a batch runs one that holds no pair.
    shares = [list(val.batches(1, None, rank, 3)) for rank in range(3)]
    assert len({len(share) for share in shares}) == 1 and len(rows) % 3
    assert sorted(p for share in shares for b in share for p in b.pair_ids.tolist()) == list(range(10))
