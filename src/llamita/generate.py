"""Generation with a static KV cache, as small functions: sample, prefill, decode_one, generate.

`prefill` and `decode_one` return logits rather than tokens, so speculative decoding and chat loops can
reuse them with their own sampling.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from llamita.config import ConfigError
from llamita.model.llama import KVCache, Llama

# Every decode step attends to one more key, and cuDNN attention (SDPA's first choice on Hopper) builds a new
# plan for each new length: ~60 ms a step on an H100, against ~0.05 ms for flash attention.
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that mean nothing, before any model work.

    Raises:
        ConfigError: temperature below 0 (or not finite), top_k below 1, or top_p outside (0, 1].
    """
    if not 0 <= temperature < math.inf:
        raise ConfigError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1 (or unset for no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (or unset), got {top_p}")


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token id per row of logits.

    Args:
        logits: [..., V] unnormalised scores.
        temperature: Divides the logits; 0 means greedy (argmax).
        top_k: Keep only the k highest-scoring tokens.
        top_p: Then keep the smallest set of tokens whose probability reaches top_p (nucleus sampling).
        generator: Random source, on logits' device, for reproducible draws.

    Returns:
        [...] int64 token ids.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)  # [...]

    logits = logits.float() / temperature  # [..., V]
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))  # [..., V]
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [..., V] each
        sorted_probs = sorted_logits.softmax(dim=-1)  # [..., V]
        # Drop a token once the tokens ranked above it already reach top_p; the best token always stays.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # [..., V]
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # [..., V] back in vocab order
        logits = logits.masked_fill(drop, float("-inf"))  # [..., V]
    probs = logits.softmax(dim=-1)  # [..., V]
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)  # [N, 1]
    return flat.view(probs.shape[:-1])  # [...]


def prefill(model: Llama, tokens: Tensor, cache: KVCache) -> Tensor:
    """Run the prompt through the model, filling the cache from position 0.

    Args:
        model: The language model.
        tokens: [B, T] prompt ids.
        cache: Empty cache with room for at least T positions.

    Returns:
        [B, V] fp32 logits for the token after the prompt.
    """
    hidden = model.hidden_states(tokens, cache, start_pos=0)[:, -1]  # [B, D]: only the last one predicts
    return model.lm_head(hidden).float()  # [B, V]


def decode_one(model: Llama, token: Tensor, cache: KVCache, pos: int) -> Tensor:
    """Feed one token per sequence at position `pos`, attending to the cached positions before it.

    Args:
        model: The language model.
        token: [B, 1] ids.
        cache: Cache filled for positions 0 .. pos - 1.
        pos: Position of `token`.

    Returns:
        [B, V] fp32 logits for the token after it.
    """
    with sdpa_kernel(_DECODE_BACKENDS):
        hidden = model.hidden_states(token, cache, start_pos=pos)[:, -1]  # [B, D]
    return model.lm_head(hidden).float()  # [B, V]


def generate(model: Llama, prompt_ids: list[int], max_new_tokens: int, **sampling: Any) -> list[int]:
    """The new token ids of `stream` (the same arguments: temperature, top_k, top_p, eos_id, seed), as one list."""
    return list(stream(model, prompt_ids, max_new_tokens, **sampling))


@torch.inference_mode()  # as a decorator it wraps each resumption of the generator, not the consumer's code
def stream(
    model: Llama,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Collection[int] | None = None,
    seed: int | None = None,
) -> Iterator[int]:
    """Continue a prompt, on whatever device the model is on, yielding each new token id as it is sampled.

    Generation stops after `max_new_tokens`, after emitting a stop id (`eos_id`: one id or several, e.g. a chat
    template's end-of-turn; it is yielded too), or when the next token would need a position beyond the model's
    max_seq_len, whichever comes first.

    Args:
        model: The language model.
        prompt_ids: Prompt token ids; at least one, at most max_seq_len.
        max_new_tokens: Upper bound on the number of tokens to generate.
        temperature: Sampling temperature; 0 means greedy.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only from the nucleus of this much probability.
        eos_id: Stop once this id (or any of these ids) has been generated.
        seed: Makes sampling reproducible; None draws from torch's global generator.

    Yields:
        The new token ids only.

    Raises:
        ConfigError: If the prompt is empty, holds ids outside the vocabulary, or is longer than max_seq_len;
            if `max_new_tokens` is below 1; or for sampling settings `check_sampling` refuses.
    """
    config = model.config
    n_prompt = len(prompt_ids)
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if n_prompt == 0:
        raise ConfigError("the prompt is empty; generation needs at least one token (e.g. the BOS id)")
    if n_prompt > config.max_seq_len:
        raise ConfigError(
            f"the prompt has {n_prompt} tokens but the model's context (max_seq_len) is {config.max_seq_len}; "
            f"shorten the prompt to at most {config.max_seq_len} tokens"
        )
    bad = [i for i in prompt_ids if not 0 <= i < config.vocab_size]
    if bad:
        raise ConfigError(f"prompt ids {bad[:5]} are outside the vocabulary 0..{config.vocab_size - 1}")
    # The last generated token is never fed back, so the sequence may end one past max_seq_len.
    n_new = min(max_new_tokens, config.max_seq_len - n_prompt + 1)

    weight = next(model.parameters())
    generator = None if seed is None else torch.Generator(device=weight.device).manual_seed(seed)
    cache = KVCache(config, 1, n_prompt + n_new - 1, device=weight.device, dtype=weight.dtype)
    stops = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)

    def pick(logits: Tensor) -> Tensor:
        return sample(logits, temperature, top_k, top_p, generator)  # [1]

    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=weight.device)  # [1, T]
    token = pick(prefill(model, tokens, cache))  # [1]
    for made in range(1, n_new + 1):
        new_id = int(token.item())
        yield new_id
        if new_id in stops or made == n_new:
            return
        pos = n_prompt + made - 1  # where the token just sampled goes
        token = pick(decode_one(model, token.view(1, 1), cache, pos))  # [1]
