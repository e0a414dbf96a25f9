import pytest
import torch

from llamita.config import ConfigError
from llamita.generate import decode_one, generate, prefill, sample
from llamita.model import KVCache, Llama, ModelConfig

TINY = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, intermediate_size=72, max_seq_len=48)


@pytest.fixture
def model() -> Llama:
    """A float64 model, so cached and recomputed logits agree far below any gap between the top two."""
    model = Llama(TINY).double()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.ndim == 2:
                # Larger than TinyLlama's init, so each token depends on its context and greedy decoding
                # wanders instead of settling on one token.
                weight.normal_(0.0, 0.3)
    return model


def _greedy_by_recomputation(model: Llama, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_cached_greedy_generation_matches_full_recomputation(model):
    prompt = [3, 14, 15, 92, 65]
    new = generate(model, prompt, 30, temperature=0)
    assert new == _greedy_by_recomputation(model, prompt, 30)
    assert len(set(new)) > 10


def test_prefill_then_decode_one_matches_forward(model):
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    cache = KVCache(TINY, batch_size=2, max_len=9, dtype=torch.float64)
    with torch.no_grad():
        full = model(tokens)  # [2, 9, V]
        first = prefill(model, tokens[:, :8], cache)
        second = decode_one(model, tokens[:, 8:], cache, 8)
    torch.testing.assert_close(first, full[:, 7].float())
    torch.testing.assert_close(second, full[:, 8].float())


def test_sample_temperature_zero_is_argmax():
    logits = torch.randn(5, 97)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=5.0, top_k=1), logits.argmax(-1))


def test_sample_never_leaves_the_top_k():
    logits = torch.randn(4, 97)
    allowed = torch.topk(logits, 5, dim=-1).indices  # [4, 5]
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 2.0, top_k=5, generator=generator) for _ in range(500)], dim=-1)
    for row in range(4):
        assert set(draws[row].tolist()) == set(allowed[row].tolist())


def test_sample_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_p=0.6, generator=generator).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.45, generator=generator).tolist()) == {0}
    assert set(sample(logits, 1.0, top_p=1.0, generator=generator).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sample_frequencies_follow_the_tempered_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = sample(logits.repeat(40000, 1), temperature, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=4).double() / len(draws)
    torch.testing.assert_close(frequencies, (logits.double() / temperature).softmax(-1), atol=0.01, rtol=0)


def test_seed_makes_sampling_reproducible(model):
    kwargs = {"temperature": 1.0, "top_p": 0.95}
    a = generate(model, [1, 2, 3], 20, seed=7, **kwargs)
    assert a == generate(model, [1, 2, 3], 20, seed=7, **kwargs)
    assert a != generate(model, [1, 2, 3], 20, seed=8, **kwargs)


def test_stops_at_eos_and_includes_it(model):
    free = generate(model, [5, 6], 30, temperature=0)
    eos = free[10]
    stopped = generate(model, [5, 6], 30, temperature=0, eos_id=eos)
    assert stopped == free[: free.index(eos) + 1]


def test_length_is_clamped_to_max_seq_len(model):
    n = TINY.max_seq_len
    assert len(generate(model, list(range(n - 3)), 100, temperature=0)) == 4
    assert len(generate(model, list(range(n)), 100, temperature=0)) == 1
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1"):
        generate(model, [1], 0)


def test_bad_prompts_and_settings_raise(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [1] * (TINY.max_seq_len + 1), 5)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 5)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [1, TINY.vocab_size], 5)
    for bad in [{"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}]:
        with pytest.raises(ValueError):
            generate(model, [1], 5, **bad)
