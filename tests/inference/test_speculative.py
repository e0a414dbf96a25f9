"""Speculative decoding: greedy output equal to plain greedy (draft model and prompt lookup), sampled output
distributed as the target's (chi-square tests), and speculation off by itself at large batches."""

from __future__ import annotations

import itertools

import pytest
import torch
from inference_models import TINY, greedy_by_recomputation, tiny_model
from test_engine import prompts, run
from test_sampling import _chi_square_p

from llamita.config import ConfigError
from llamita.inference import Engine, EngineConfig, SamplingParams
from llamita.inference.sampling import SamplingTensors
from llamita.inference.speculative import accept, ngram_draft
from llamita.model import ModelConfig


def test_ngram_draft_continues_the_latest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert ngram_draft(tokens, 3, max_n=2) == [7, 8, 5]  # "2 3" last recurred before "7 8 5"
    assert ngram_draft([4, 5, 6, 4], 3, max_n=3) == [5, 6, 4]
    assert ngram_draft([4, 5, 6, 4, 5], 3, max_n=3) == [6, 4, 5]
    assert ngram_draft([1, 2, 3], 2, max_n=3) == [3, 3]  # no match: the last token
    assert ngram_draft([1, 2, 1], 4, max_n=3) == [2, 1, 1, 1]  # a short continuation is padded


def test_the_acceptance_rule_samples_the_target_distribution():
    """First token of the rule's output, over many seeds, against p: for drafts from q and for one-hot drafts."""
    g = torch.Generator().manual_seed(0)
    V, G, n = 6, 2, 30000
    p = (torch.randn(G + 1, V, generator=g) * 1.5).softmax(-1)  # [G + 1, V]
    q = (torch.randn(G, V, generator=g) * 1.5).softmax(-1)  # [G, V]
    t = SamplingTensors.of([SamplingParams()] * n, list(range(n)), V, "cpu")
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(G)], 1)  # [n, G]
    tokens, kept = accept(p.expand(n, -1, -1), q.expand(n, -1, -1), drafts, t, torch.full((n,), 5))
    assert _chi_square_p(torch.bincount(tokens[:, 0], minlength=V).double(), p[0].double()) > 1e-3
    # The second token, where the first draft was kept, follows p[1] too.
    second = tokens[kept >= 1, 1]
    assert _chi_square_p(torch.bincount(second, minlength=V).double(), p[1].double()) > 1e-3
    fixed = torch.full((n, G), 2)  # a deterministic drafter always proposes token 2
    one_hot = torch.nn.functional.one_hot(fixed, V).double()
    tokens, kept = accept(p.expand(n, -1, -1), one_hot, fixed, t, torch.full((n,), 5))
    assert _chi_square_p(torch.bincount(tokens[:, 0], minlength=V).double(), p[0].double()) > 1e-3
    assert float(kept.ge(1).double().mean()) == pytest.approx(float(p[0, 2]), abs=0.01)


@pytest.mark.parametrize("overlap", [False, True], ids=["in-order", "overlap"])
@pytest.mark.parametrize("prefill", ["grouped", "padded", "packed"])
@pytest.mark.parametrize("kind", ["draft", "self-draft", "ngram"])
def test_speculative_greedy_equals_plain_greedy(model, kind, prefill, overlap):
    """A weak draft (mostly rejected), the target as its own draft (always accepted) and prompt lookup; with the
    prompts prefilled in groups as they come, padded to buckets (`prefill_graphs`: the draft prefills the same
    padding), or packed one token a row with the decode kernel (`packed_prefill`: the draft's cache too); steps in
    order, or launched ahead (`overlap`: a draft step after a draft step drafts from the device's tokens)."""
    draft = {"draft": tiny_model(ModelConfig(**{**TINY.__dict__, "n_layers": 1, "dim": 24, "n_heads": 2,
                                                "n_kv_heads": 1}), seed=1),
             "self-draft": model, "ngram": None}[kind]  # fmt: skip
    config = EngineConfig(
        speculate="ngram" if kind == "ngram" else "draft", gamma=3, max_batch=3, prefill_graphs=prefill == "padded",
        decode_attention="triton" if prefill == "packed" else None, packed_prefill=prefill == "packed",
        overlap=overlap,
    )  # fmt: skip
    engine = Engine(model, config, draft=draft)
    assert engine.packed_prefill == (prefill == "packed")
    ps = prompts(5, seed=7) + [[5, 6, 7, 5, 6, 7, 5, 6]]  # the last one repeats itself: lookup drafts get kept
    arrivals = {
        0: [(p, SamplingParams(temperature=0.0, max_tokens=14)) for p in ps[:3]],
        4: [(p, SamplingParams(temperature=0.0, max_tokens=14)) for p in ps[3:]],
    }
    seqs, _ = run(engine, arrivals)
    for seq in seqs:
        assert seq.output == greedy_by_recomputation(model, seq.prompt, seq.max_new)
    stats = engine.stats
    assert stats.target_steps > 0 and stats.acceptance_rate is not None
    if overlap and kind != "ngram":  # draft steps launched ahead; lookup steps land the step before first
        assert stats.ahead_steps > 0
    if kind == "self-draft":
        assert stats.acceptance_rate == 1.0 and stats.tokens_per_target_step > 3
    if kind == "draft":
        assert stats.acceptance_rate < 0.5


def test_speculative_sampling_is_distributed_as_the_target():
    """The joint distribution of the first three tokens (two of them from one speculative step) over many seeds,
    against the target's exact probabilities, on a model with a vocabulary of five."""
    small = ModelConfig(vocab_size=5, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=32, max_seq_len=16)
    target, draft = tiny_model(small, seed=2, std=0.5), tiny_model(small, seed=3, std=0.5)
    prompt = [1, 3]
    config = EngineConfig(speculate="draft", gamma=2, max_batch=1000, speculate_max_batch=1000)
    engine = Engine(target, config, draft=draft)
    n = 6000
    seqs, _ = run(engine, {0: [(prompt, SamplingParams(temperature=1.0, max_tokens=3, seed=s)) for s in range(n)]})
    assert engine.stats.target_steps > 0 and 0 < engine.stats.acceptance_rate < 1
    cells = list(itertools.product(range(5), repeat=3))
    counts = torch.zeros(len(cells), dtype=torch.float64)
    for seq in seqs:
        counts[cells.index(tuple(seq.output))] += 1
    with torch.no_grad():
        probs = torch.ones(len(cells), dtype=torch.float64)
        for i, cell in enumerate(cells):
            ids = prompt + list(cell)
            logp = target(torch.tensor([ids]))[0].double().softmax(-1)  # [T, V]
            for k in range(3):
                probs[i] *= logp[len(prompt) - 1 + k, cell[k]]
    assert _chi_square_p(counts, probs) > 1e-3


@pytest.mark.parametrize("kind", ["draft", "ngram"])
def test_speculative_forwards_run_the_compiled_blocks(model, kind):
    """With the engine's blocks compiled (on a CPU through dynamo's eager backend), a speculative step's forwards go
    through them: the target's verifying forward of gamma + 1 tokens a row through the target's compiled block, the
    draft model's forwards (prefill, catch-up, drafting) through a compilation of their own. Eager blocks inside
    the step's CUDA graphs made a step with n-gram drafts cost 4.5 ms on an H200 against 1.3 ms for a plain step.
    The output stays plain greedy's."""
    import functools

    from llamita.inference.engine import cached_hidden

    draft = tiny_model(ModelConfig(**{**TINY.__dict__, "n_layers": 1, "dim": 24, "n_heads": 2, "n_kv_heads": 1}))
    config = EngineConfig(speculate=kind, gamma=3, max_batch=3, compile_backend="eager")
    engine = Engine(model, config, draft=draft if kind == "draft" else None)
    widths: dict[str, list[int]] = {"target": [], "draft": []}

    def spy(name, layer_fn):  # noqa: ANN001, ANN202
        assert layer_fn is not None, f"the {name}'s blocks are not compiled"

        def run_block(block, x, *rest):  # noqa: ANN001, ANN202
            widths[name].append(x.shape[-1] * 1000 + x.shape[1])  # the model's dim, then the tokens a row
            return layer_fn(block, x, *rest)

        return functools.partial(cached_hidden, layer_fn=run_block)

    engine._hidden = spy("target", engine._hidden.keywords["layer_fn"])
    if kind == "draft":
        engine._draft_hidden = spy("draft", engine._draft_hidden.keywords["layer_fn"])
    ps = prompts(2, seed=7) + [[5, 6, 7, 5, 6, 7, 5, 6]]
    seqs, _ = run(engine, {0: [(p, SamplingParams(temperature=0.0, max_tokens=10)) for p in ps]})
    for seq in seqs:
        assert seq.output == greedy_by_recomputation(model, seq.prompt, seq.max_new)
    assert engine.stats.target_steps > 0
    assert TINY.dim * 1000 + 4 in widths["target"]  # a verifying forward: the current token and 3 drafts
    if kind == "draft":
        assert {w // 1000 for w in widths["draft"]} == {24} and 24 * 1000 + 1 in widths["draft"]


def test_speculation_steps_aside_at_large_batches(model):
    engine = Engine(model, EngineConfig(speculate="ngram", speculate_max_batch=2, max_batch=4))
    seqs, _ = run(engine, {0: [(p, SamplingParams(temperature=0.0, max_tokens=6)) for p in prompts(4, seed=9)]})
    assert engine.stats.target_steps == 0 and engine.stats.decode_steps > 0
    for seq in seqs:
        assert seq.output == greedy_by_recomputation(model, seq.prompt, 6)


@pytest.mark.parametrize("overlap", [False, True], ids=["in-order", "overlap"])
def test_a_draft_catches_up_after_steps_without_speculation(model, overlap):
    """Four requests decode without speculation (more rows than speculate_max_batch); as the longer ones are left
    in slots 0 and 1, the draft model feeds what it missed and speculation resumes, with plain greedy's output;
    with steps launched ahead too (plain steps ahead of plain ones, the first draft step after them in order)."""
    draft = tiny_model(ModelConfig(**{**TINY.__dict__, "n_layers": 1, "dim": 24, "n_heads": 2, "n_kv_heads": 1}))
    config = EngineConfig(speculate="draft", gamma=3, speculate_max_batch=2, max_batch=4, overlap=overlap)
    engine = Engine(model, config, draft=draft)
    lengths = [16, 14, 3, 2]  # slots 0 .. 3; the two short ones end first
    seqs, _ = run(engine, {0: [(p, SamplingParams(temperature=0.0, max_tokens=n))
                               for p, n in zip(prompts(4, seed=11), lengths)]})  # fmt: skip
    assert engine.stats.decode_steps > 0 and engine.stats.target_steps > 0
    for seq in seqs:
        assert seq.output == greedy_by_recomputation(model, seq.prompt, seq.max_new)


def test_a_draft_must_match_the_target(model):
    with pytest.raises(ConfigError, match="needs a draft model"):
        Engine(model, EngineConfig(speculate="draft"))
    other = tiny_model(ModelConfig(**{**TINY.__dict__, "vocab_size": 50}))
    with pytest.raises(ConfigError, match="share the target's tokenizer"):
        Engine(model, EngineConfig(speculate="draft"), draft=other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True], ids=["eager-blocks", "compiled-blocks"])
@pytest.mark.parametrize("kind", ["draft", "ngram"])
def test_captured_speculative_steps_decode_as_the_eager_ones(model, kind, compile):
    import warnings

    cuda = model.to("cuda")
    draft = None
    if kind == "draft":
        config = ModelConfig(**{**TINY.__dict__, "n_layers": 1, "dim": 24, "n_heads": 2, "n_kv_heads": 1})
        draft = tiny_model(config, seed=1).to("cuda")
    config = {"speculate": kind, "gamma": 3, "max_batch": 3, "compile": compile}
    ps = prompts(4, seed=5) + [[5, 6, 7, 5, 6, 7, 5, 6]]
    arrivals = {0: [(p, SamplingParams(temperature=0.0, max_tokens=14)) for p in ps[:3]],
                4: [(p, SamplingParams(temperature=0.0, max_tokens=14)) for p in ps[3:]]}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no step may run uncaptured
        engine = Engine(cuda, EngineConfig(**config), draft=draft)
        graphed, _ = run(engine, arrivals)
    assert engine.speculator.graphs is not None and engine.stats.target_steps > 0
    eager, _ = run(Engine(cuda, EngineConfig(**{**config, "compile": False}, cuda_graphs=False), draft=draft), arrivals)
    assert [s.output for s in graphed] == [s.output for s in eager]  # eager: against the reference, on the CPU
    model.to("cpu")
