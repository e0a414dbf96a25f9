"""Per-request sampling against a float64 reference written row by row, and its counter-based seeds."""

from __future__ import annotations

import math

import pytest
import torch

from llamita.config import ConfigError
from llamita.inference.sampling import (
    SamplingParams,
    SamplingTensors,
    logprobs,
    processed_logits,
    sample,
    uniform,
)

V = 50


def reference_probs(
    logits: list[float], p: SamplingParams, seen: set[int], counts: dict[int, int] | None = None
) -> list[float]:
    """One row's sampling distribution in float64, step by step as transformers' processors compute it, with
    OpenAI's frequency and presence penalties (`counts`: the output's tokens) after the repetition penalty."""
    x = [
        (v / p.repetition_penalty if v > 0 else v * p.repetition_penalty) if i in seen else v
        for i, v in enumerate(logits)
    ]
    for i, n in (counts or {}).items():
        x[i] -= p.frequency_penalty * n + p.presence_penalty * (n > 0)
    if p.temperature == 0:
        best = max(range(len(x)), key=lambda i: x[i])
        return [float(i == best) for i in range(len(x))]
    x = [v / p.temperature for v in x]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = set(order[: p.top_k or len(x)])
    z = sum(math.exp(x[i]) for i in keep)
    mass, nucleus = 0.0, set()
    for i in order:
        if i in keep and mass < p.top_p:
            nucleus.add(i)
            mass += math.exp(x[i]) / z
    best = max(x)
    kept = [i for i in nucleus if x[i] >= best + (math.log(p.min_p) if p.min_p > 0 else -math.inf)]
    z = sum(math.exp(x[i]) for i in kept)
    return [math.exp(x[i]) / z if i in kept else 0.0 for i in range(len(x))]


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=2.0),
    SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=1.5, frequency_penalty=0.5),
    SamplingParams(temperature=1.0, presence_penalty=-1.0, frequency_penalty=2.0, repetition_penalty=1.2),
]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, SamplingTensors]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(PARAMS), V, generator=g) * 2  # [B, V]
    seen = torch.rand(len(PARAMS), V, generator=g) < 0.3  # [B, V]
    t = SamplingTensors.of(PARAMS, list(range(len(PARAMS))), V, "cpu")
    return logits, seen, t


def _output_counts(seen: torch.Tensor, seed: int = 5) -> torch.Tensor:
    """[B, V] float32 output counts 0..3 on a part of the seen tokens (the output is part of what was seen)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 4, seen.shape, generator=g) * seen).float()  # [B, V]


def test_processed_distribution_equals_the_float64_reference():
    logits, seen, t = _batch()
    counts = _output_counts(seen)
    probs = processed_logits(logits, t, seen, filters=True, counts=counts).double().softmax(-1)  # [B, V]
    for row, p in enumerate(PARAMS):
        row_counts = {i: int(counts[row, i]) for i in counts[row].nonzero().flatten().tolist()}
        seen_row = set(seen[row].nonzero().flatten().tolist())
        expected = reference_probs(logits[row].double().tolist(), p, seen_row, row_counts)
        torch.testing.assert_close(probs[row], torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_penalties_of_zero_leave_the_logits_unchanged_whatever_the_counts():
    logits, seen, t = _batch(6)
    plain = [i for i, p in enumerate(PARAMS) if p.presence_penalty == 0 and p.frequency_penalty == 0]
    with_counts = processed_logits(logits, t, seen, filters=True, counts=_output_counts(seen) + 1)[plain]
    torch.testing.assert_close(with_counts, processed_logits(logits, t, seen, filters=True)[plain], atol=0, rtol=0)


def test_without_filters_rows_that_need_none_are_unchanged():
    logits, seen, t = _batch(1)
    plain = [i for i, p in enumerate(PARAMS) if not p.filters]
    a = processed_logits(logits, t, seen, filters=True)[plain]
    b = processed_logits(logits, t, seen, filters=False)[plain]
    torch.testing.assert_close(a.softmax(-1), b.softmax(-1), atol=1e-6, rtol=0)


def test_greedy_rows_take_the_argmax_of_the_penalized_logits():
    logits, seen, t = _batch(2)
    position = torch.arange(len(PARAMS))
    tokens = sample(logits, t, seen, position, filters=True)
    assert tokens[5] == logits[5].argmax()
    penalized = torch.where(seen[6], torch.where(logits[6] > 0, logits[6] / 2, logits[6] * 2), logits[6])
    assert tokens[6] == penalized.argmax()


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of Pearson's chi-square test of `counts` against `probs`; cells expecting fewer than 5 counts
    are pooled into one, as the test's approximation needs."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))


@pytest.mark.parametrize("row", [0, 1, 2, 4])
def test_draws_follow_the_distribution(row):
    """Many draws of one request (positions 0..N-1 of one seed) pass a chi-square test against the reference."""
    logits, seen, _ = _batch(3)
    n = 20000
    p = PARAMS[row]
    t = SamplingTensors.of([p] * n, [123] * n, V, "cpu")
    tokens = sample(logits[row].expand(n, V), t, seen[row].expand(n, V), torch.arange(n), filters=p.filters)
    counts = torch.bincount(tokens, minlength=V).double()
    probs = torch.tensor(reference_probs(logits[row].double().tolist(), p, set(seen[row].nonzero().flatten().tolist())))
    assert counts[probs == 0].sum() == 0  # never a token the settings exclude
    assert _chi_square_p(counts, probs.double()) > 1e-3


def test_uniforms_are_uniform_and_independent_of_the_batch():
    u = uniform(torch.tensor([7, 7, 8]), torch.tensor([3, 4, 3]), 100000)  # [3, 100000]
    assert 0 < u.min() and u.max() < 1
    for row in u:
        counts = torch.histc(row, bins=20, min=0, max=1).double()
        assert _chi_square_p(counts, torch.full((20,), 0.05, dtype=torch.float64)) > 1e-3
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    alone = uniform(torch.tensor([7]), torch.tensor([3]), 100000)
    assert torch.equal(alone[0], u[0])


def test_a_seed_gives_the_same_draw_whatever_else_is_in_the_batch():
    logits, seen, _ = _batch(4)
    p = SamplingParams(temperature=1.5, top_p=0.95)
    alone = sample(logits[:1], SamplingTensors.of([p], [42], V, "cpu"), None, torch.tensor([9]), filters=True)
    others = [SamplingParams(temperature=0.5), SamplingParams(temperature=0.0), p]
    t = SamplingTensors.of([*others, p], [1, 2, 3, 42], V, "cpu")
    batch = torch.cat([logits[1:4], logits[:1]])
    together = sample(batch, t, None, torch.tensor([5, 6, 9, 9]), filters=True)
    assert together[3] == alone[0]
    draws = {
        int(sample(logits[:1], SamplingTensors.of([p], [s], V, "cpu"), None, torch.tensor([9]), True))
        for s in range(30)
    }
    assert len(draws) > 3  # and other seeds do give other tokens


def test_logprobs_equal_the_float64_log_softmax():
    logits, _, _ = _batch(5)
    chosen = torch.arange(len(PARAMS))
    lp, ids, top = logprobs(logits, chosen, 3)
    reference = logits.double().log_softmax(-1)
    torch.testing.assert_close(lp.double(), reference[torch.arange(len(PARAMS)), chosen], atol=1e-5, rtol=0)
    torch.testing.assert_close(top.double(), reference.topk(3).values, atol=1e-5, rtol=0)
    assert torch.equal(ids, reference.topk(3).indices)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"min_p": 2.0}, "min_p must be in [0, 1]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
        ({"frequency_penalty": -3.0}, "frequency_penalty must be in [-2, 2]"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"logprobs": -1}, "logprobs must be >= 0"),
        ({"stop": ("",)}, "stop strings"),
    ],
)
def test_bad_settings_are_refused_by_name(bad, needle):
    with pytest.raises(
        ConfigError,
        match=f"SamplingParams: {needle}".replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        SamplingParams(**bad)
