"""Shared by the preference tests: a tiny GQA model, its transformers twin, random pairs, and the reference
log-probs of each pair's two full sequences computed by transformers."""

from __future__ import annotations

import numpy as np
import torch

from llamita.chat.packing import Pair
from llamita.model import Llama, ModelConfig

TINY = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48, max_seq_len=96)


def random_pairs(rng: np.random.Generator, n: int, first_id: int = 0) -> list[Pair]:
    """Pairs of random ids: prompts of 2-20 tokens, answers of 1-14."""

    def ids(length: int) -> tuple[int, ...]:
        return tuple(int(i) for i in rng.integers(3, TINY.vocab_size, length))

    return [
        Pair(ids(rng.integers(2, 21)), ids(rng.integers(1, 15)), ids(rng.integers(1, 15)), first_id + i, f"pair{i}")
        for i in range(n)
    ]


def hf_twin(model: Llama, dtype: torch.dtype = torch.float64):
    """transformers' LlamaForCausalLM with `model`'s weights (our state dict is an HF state dict)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamita.interop.hf import hf_config_dict

    config = hf_config_dict(model.config, torch.float32, 1, 2)
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    hf = LlamaForCausalLM(LlamaConfig(**config)).to(dtype)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def hf_pair_logps(hf, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's summed log-probs of (chosen, rejected) as two separate sequences prompt + answer, through
    transformers, and the answers' lengths: ([n, 2] in the model's dtype, with gradients; [n, 2])."""
    out, lengths = [], []
    for pair in pairs:
        sides = []
        for answer in (pair.chosen, pair.rejected):
            ids = torch.tensor([pair.prompt + answer])
            logp = hf(ids).logits[0].log_softmax(-1)  # [L, V]
            start = len(pair.prompt) - 1  # the prompt's last token predicts the answer's first
            targets = torch.tensor(answer)
            sides.append(logp[start : start + len(answer)].gather(1, targets[:, None]).sum())
        out.append(torch.stack(sides))
        lengths.append([len(pair.chosen), len(pair.rejected)])
    return torch.stack(out), torch.tensor(lengths)
