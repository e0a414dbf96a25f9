"""Vocabulary growth: new embedding (and untied lm_head) rows start at the mean of the old rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llamita.chat.vocab import resize_token_embeddings
from llamita.model import Llama, ModelConfig

TINY = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48, max_seq_len=32)


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_are_the_mean_of_the_old_rows(tied):
    model = Llama(dataclasses.replace(TINY, tie_embeddings=tied))
    embed = model.model.embed_tokens.weight.detach().clone()  # [61, D]
    head = model.lm_head.weight.detach().clone()  # [61, D]
    assert resize_token_embeddings(model, 63) == 2
    assert model.config.vocab_size == 63 and model.model.embed_tokens.num_embeddings == 63
    new_embed, new_head = model.model.embed_tokens.weight, model.lm_head.weight
    assert new_embed.shape == new_head.shape == (63, TINY.dim)
    torch.testing.assert_close(new_embed[:61], embed, rtol=0, atol=0)
    torch.testing.assert_close(new_embed[61:], embed.mean(0).expand(2, -1))
    torch.testing.assert_close(new_head[:61], head, rtol=0, atol=0)
    torch.testing.assert_close(new_head[61:], head.mean(0).expand(2, -1))
    assert (new_head is new_embed) == tied
    assert new_embed.requires_grad and new_head.requires_grad

    logits = model(torch.tensor([[1, 61, 62]]))  # [1, 3, 63]: the new ids embed and are predicted
    assert logits.shape == (1, 3, 63)
    loss = model(torch.tensor([[1, 61, 62]]), targets=torch.tensor([[61, 62, 5]]))
    loss.backward()
    assert new_embed.grad is not None and new_embed.grad[61:].abs().sum() > 0


def test_a_model_with_enough_rows_is_left_alone():
    model = Llama(TINY)
    weight = model.model.embed_tokens.weight
    assert resize_token_embeddings(model, 61) == 0
    assert resize_token_embeddings(model, 40) == 0  # a padded vocabulary already holds the tokens
    assert model.model.embed_tokens.weight is weight and model.config.vocab_size == 61
