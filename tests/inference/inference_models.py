"""Tiny float64 models for the engine's tests (cached and recomputed logits agree far below any gap between
tokens), and the reference decoder: a full forward for every token."""

from __future__ import annotations

import torch

from llamita.model import Llama, ModelConfig

TINY = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, intermediate_size=72, max_seq_len=48)


def tiny_model(config: ModelConfig = TINY, seed: int = 0, std: float = 0.3) -> Llama:
    """A float64 model whose weights are larger than TinyLlama's init, so that each token depends on its context
    and greedy decoding wanders instead of settling on one token."""
    torch.manual_seed(seed)
    model = Llama(config).double()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.ndim == 2:
                weight.normal_(0.0, std)
    return model.eval()


def greedy_by_recomputation(
    model: Llama, prompt: list[int], n: int, penalty: float = 1.0, presence: float = 0.0, frequency: float = 0.0
) -> list[int]:
    """The reference: the full forward over the whole sequence for every new token (no cache at all); with the
    repetition penalty over prompt and output, then OpenAI's presence and frequency penalties over the output."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            if penalty != 1:
                seen = torch.tensor(sorted(set(ids)))
                logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
            for token in set(ids[len(prompt) :]):
                logits[token] -= frequency * ids[len(prompt) :].count(token) + presence
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]
