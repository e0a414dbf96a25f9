"""The engine against the reference decoder (a full forward per token): batching, joining and leaving, chunked
prefill, the prefix cache, back-pressure, seeds, stops and logprobs."""

from __future__ import annotations

import contextlib

import pytest
import torch
from inference_models import TINY, greedy_by_recomputation, tiny_model

from llamita.config import ConfigError
from llamita.inference import LLM, Engine, EngineConfig, SamplingParams
from llamita.inference.cache import SlotCache, decode_attention_for
from llamita.inference.engine import block_step, model_logits, packed_rows

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def run(engine: Engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]) -> tuple[list, int]:
    """Step the engine until it is idle, adding requests at the steps `arrivals` names; returns the sequences and
    the most that ever ran at once."""
    seqs, most, step = [], 0, 0
    while engine.has_work() or any(k >= step for k in arrivals):
        seqs += [engine.add(prompt, params) for prompt, params in arrivals.get(step, [])]
        engine.step()
        most = max(most, len(engine.scheduler.running))
        step += 1
    return seqs, most


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, TINY.vocab_size, (int(torch.randint(1, 20, (), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def test_batched_greedy_equals_one_at_a_time_with_requests_joining_and_leaving(model):
    engine = Engine(model, EngineConfig(max_batch=4))
    ps = prompts(9)
    lengths = [3, 12, 7, 1, 9, 12, 5, 10, 2]  # different lengths: sequences leave at different steps
    arrivals = {0: [], 2: [], 5: []}
    for i, (p, n) in enumerate(zip(ps, lengths)):
        arrivals[[0, 2, 5][i % 3]].append((p, SamplingParams(temperature=0.0, max_tokens=n)))
    seqs, most = run(engine, arrivals)
    assert most == 4  # the cache was full: the later requests waited for slots
    for seq in seqs:
        assert seq.output == greedy_by_recomputation(model, seq.prompt, seq.max_new), seq.prompt
        assert seq.finish_reason == "length"
    assert all(s is None for s in engine.scheduler.slots) and sorted(engine.scheduler.free) == [0, 1, 2, 3]


def test_overlap_runs_steps_ahead_with_the_same_outputs(model):
    """`EngineConfig.overlap`: requests joining a full cache and leaving at different steps, chunked prompts,
    greedy and seeded sampling, a repetition penalty, a stop id, a slot's end, a request asking for logprobs (the
    steps it runs in go in order) and an abort while a step runs ahead give the outputs, logprobs and finish
    reasons of the engine stepping in order; the steps ran ahead but those, and the cache ends empty."""
    free = greedy_by_recomputation(model, [5, 6], 12)
    stop = free[6]
    arrivals: dict[int, list] = {0: [], 2: [], 5: []}
    for i, (p, n) in enumerate(zip(prompts(9), [3, 12, 7, 1, 9, 12, 5, 10, 2])):
        params = SamplingParams(temperature=0.9 * (i % 2), max_tokens=n, seed=i, repetition_penalty=1.3 ** (i % 3 == 0))
        arrivals[[0, 2, 5][i % 3]].append((p, params))
    arrivals[5].append(([5, 6], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop,))))
    arrivals[9] = [(list(range(17)), SamplingParams(temperature=0.0, max_tokens=100))]  # its slot ends (20)
    arrivals[30] = [([3, 4], SamplingParams(temperature=0.0, max_tokens=4, logprobs=2))]
    outputs, stats = {}, {}
    for overlap in (False, True):
        engine = Engine(model, EngineConfig(max_batch=4, max_seq_len=20, prefill_tokens=8, overlap=overlap))
        seqs, most = run(engine, arrivals)
        assert most == 4 and all(s is None for s in engine.scheduler.slots) and not engine.has_work()
        outputs[overlap] = [(s.output, s.finish_reason, s.logprobs) for s in seqs]
        stats[overlap] = engine.stats
    assert outputs[True] == outputs[False]
    assert [reason for _, reason, _ in outputs[True]][-3:] == ["stop", "length", "length"]
    assert outputs[True][-3][0] == free[: free.index(stop) + 1] and len(outputs[True][-2][0]) == 3
    assert len(outputs[True][-1][2]) == 4
    in_order = stats[True].steps - stats[True].ahead_steps
    assert stats[False].ahead_steps == 0 and 2 <= in_order <= 8, (stats[True].steps, stats[True].ahead_steps)
    # Alone, a sequence crosses from one read bucket to the next while steps run ahead: each step reads the token
    # it feeds, which the host has not counted yet.
    assert not Engine(model, EngineConfig(max_batch=2)).overlap  # on a CPU, by default
    engine = Engine(model, EngineConfig(overlap=True))
    assert engine.buckets == [24, 48]
    decode, fed = engine._decode, []

    def reading(batch, attend, filters):
        fed.append((int(engine.positions[:batch].max()), attend))  # the position fed, the positions read
        return decode(batch, attend, filters)

    engine._decode = reading
    seqs, _ = run(engine, {0: [(list(range(1, 11)), SamplingParams(temperature=0.0, max_tokens=30))]})
    assert seqs[0].output == greedy_by_recomputation(model, list(range(1, 11)), 30)
    assert all(position < attend for position, attend in fed) and (24, 48) in fed
    # An abort while a step runs ahead: its token is dropped, the other sequence goes on to its end.
    engine = Engine(model, EngineConfig(overlap=True))
    cut, other = engine.add([5, 6], GREEDY), engine.add([1, 2], GREEDY)
    for _ in range(4):
        engine.step()
    assert engine._ahead is not None
    engine.abort(cut)
    kept = list(cut.output)
    while engine.has_work():
        engine.step()
    assert cut.output == kept == free[: len(kept)] and cut.finish_reason == "abort"
    assert other.output == greedy_by_recomputation(model, [1, 2], 12)
    # With speculation (tests/inference/test_speculative.py): draft steps run ahead; not so by default.
    assert not Engine(model, EngineConfig(speculate="ngram", max_batch=2)).overlap


def test_a_prefill_interval_gathers_prompts_and_keeps_every_output(model):
    """With prefill_interval 4, prompts that arrive while others decode wait at most 3 steps and are prefilled
    together: fewer prefill steps, the same greedy outputs."""
    ps, lengths = prompts(10, seed=3), [6, 11, 3, 9, 12, 4, 8, 10, 5, 7]
    arrivals: dict[int, list] = {}
    for i, (p, n) in enumerate(zip(ps, lengths)):  # one request every other step
        arrivals.setdefault(2 * i, []).append((p, SamplingParams(temperature=0.0, max_tokens=n)))
    every_step, _ = run(Engine(model, EngineConfig(max_batch=8)), arrivals)
    engine = Engine(model, EngineConfig(max_batch=8, prefill_interval=4))
    seqs, waits, step = [], [], 0
    while engine.has_work() or any(k >= step for k in arrivals):
        seqs += [engine.add(prompt, params) for prompt, params in arrivals.get(step, [])]
        engine.step()
        waits += [step - 2 * i for i, s in enumerate(seqs) if s.prefilled and len(waits) <= i]
        step += 1
    assert [s.output for s in seqs] == [s.output for s in every_step]
    assert max(waits) == 3  # at most interval - 1 steps waited (the first had nothing decoding: none)
    assert engine.stats.prefill_steps < len(ps)  # prompts shared prefill steps


def test_engine_logits_equal_the_training_forward(model):
    """Prefill chunks and ragged decode rows through the cache give the logits of the plain causal forward."""
    cache = SlotCache(TINY, 3, 24, device=torch.device("cpu"), dtype=torch.float64)
    tokens = torch.randint(0, TINY.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(tokens)  # [3, 20, V]
        lengths = [5, 9, 13]  # rows at different positions: prefill each alone, in two chunks
        for row, n in enumerate(lengths):
            for a, b in [(0, n // 2), (n // 2, n)]:
                pos = torch.arange(a, b)[None]
                got = model_logits(model, cache.rows(row, row + 1), tokens[row : row + 1, a:b], pos)
                torch.testing.assert_close(got[0].double(), full[row, a:b], atol=1e-5, rtol=0)
        for step in range(5):  # then decode all three together, each at its own position
            pos = torch.tensor(lengths)[:, None] + step
            got = model_logits(model, cache.rows(0, 3), tokens.gather(1, pos), pos)[:, 0]
            torch.testing.assert_close(got.double(), full[torch.arange(3), pos[:, 0]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("decode", [None, "triton"], ids=["default", "kernel-packed-prefill"])
def test_logprobs_equal_the_training_forward(model, decode):
    """The first token's logprobs come from the prefill (grouped, or packed with the kernel), the rest from decode
    steps."""
    llm = LLM(model, decode_attention=decode, packed_prefill=decode == "triton")
    assert llm.engine.packed_prefill == (decode == "triton")
    prompt = [4, 8, 15, 16, 23, 42]
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, logprobs=3))[0]
    with torch.no_grad():
        reference = model(torch.tensor([prompt + out.token_ids]))[0, len(prompt) - 1 : -1].log_softmax(-1)  # [6, V]
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert entry["logprob"] == pytest.approx(float(reference[i, token]), abs=1e-5)
        best = reference[i].topk(3)
        assert [t for t, _ in entry["top"]] == best.indices.tolist()
        assert [v for _, v in entry["top"]] == pytest.approx(best.values.tolist(), abs=1e-5)


@pytest.mark.parametrize(
    "settings",
    [
        {"max_batch": 4},
        {"max_batch": 3, "prefill_tokens": 5},
        {"max_batch": 4, "prefix_cache": True, "prefix_block": 4},
    ],
    ids=["joining", "chunked", "prefix"],
)
def test_padded_prefill_buckets_decode_as_the_reference(model, settings):
    """`prefill_graphs`: each group of prompt chunks is padded to its bucket (rows, a power-of-two width, a read
    length) as its CUDA graph would be; on a CPU the padded forward runs eagerly. Greedy outputs equal the
    reference's, with requests joining, prompts in chunks and a shared prefix."""
    ps, lengths = prompts(9, seed=11), [3, 12, 7, 1, 9, 12, 5, 10, 2]
    ps[1] = list(range(3, 15))  # arrives at step 2, decodes 12 tokens
    ps[5] = ps[1][:8] + [5, 6, 7]  # arrives at step 5: its first 8 tokens are in ps[1]'s slot (prefix cache)
    arrivals: dict[int, list] = {0: [], 2: [], 5: []}
    for i, (p, n) in enumerate(zip(ps, lengths)):
        arrivals[[0, 2, 5][i % 3]].append((p, SamplingParams(temperature=0.0, max_tokens=n)))
    engine = Engine(model, EngineConfig(prefill_graphs=True, **settings))
    widths = []
    padded = engine._prefill_padded

    def recording(group, *bucket):
        widths.append((len(group), max(c.n for c in group)))
        return padded(group, *bucket)

    engine._prefill_padded = recording
    seqs, _ = run(engine, arrivals)
    for seq in seqs:
        assert seq.output == greedy_by_recomputation(model, seq.prompt, seq.max_new), seq.prompt
    assert widths and any(w not in (1, 2, 4, 8, 16) for _, w in widths)  # padded, not only a power of two already
    if settings.get("prefix_cache"):
        assert engine.stats.reused_tokens > 0


@pytest.mark.parametrize(
    "settings",
    [
        {"max_batch": 4},
        {"max_batch": 3, "prefill_tokens": 5},
        {"max_batch": 4, "prefix_cache": True, "prefix_block": 4},
        {"max_batch": 4, "prefill_graphs": True},
    ],
    ids=["joining", "chunked", "prefix", "padded"],
)
def test_packed_prefill_decodes_as_the_reference(model, settings):
    """`packed_prefill` (with decode_attention="triton", on a CPU the kernel's reference): a step's prompt chunks
    go through one forward of one token a row, each token in its sequence's slot, whatever their lengths (padded to
    a bucket of rows with `prefill_graphs`, as a CUDA graph replays it). Greedy outputs equal the reference's, with
    requests joining, prompts in chunks and a shared prefix."""
    ps, lengths = prompts(9, seed=11), [3, 12, 7, 1, 9, 12, 5, 10, 2]
    ps[1] = list(range(3, 15))
    ps[5] = ps[1][:8] + [5, 6, 7]  # its first 8 tokens are in ps[1]'s slot (prefix cache)
    arrivals: dict[int, list] = {0: [], 2: [], 5: []}
    for i, (p, n) in enumerate(zip(ps, lengths)):
        arrivals[[0, 2, 5][i % 3]].append((p, SamplingParams(temperature=0.0, max_tokens=n)))
    engine = Engine(model, EngineConfig(decode_attention="triton", packed_prefill=True, **settings))
    assert engine.packed_prefill
    forwards, packed = [], engine._packed_logits

    def recording(tokens, positions, slots, last):
        forwards.append((tokens.shape[0], last.shape[0]))
        return packed(tokens, positions, slots, last)

    engine._packed_logits = recording
    seqs, _ = run(engine, arrivals)
    for seq in seqs:
        assert seq.output == greedy_by_recomputation(model, seq.prompt, seq.max_new), seq.prompt
    assert len(forwards) == engine.stats.prefill_steps  # one forward a step, whatever the prompts' lengths
    assert any(chunks > 1 for _, chunks in forwards)
    if settings.get("prefill_graphs"):
        assert all(rows in (16, 32, 64) for rows, _ in forwards)  # padded to a bucket
    else:
        assert sum(rows for rows, _ in forwards) == engine.stats.prefill_tokens
    if settings.get("prefix_cache"):
        assert engine.stats.reused_tokens > 0


def test_packed_prefill_rows_and_its_requirement(model):
    """A packed prefill's rows: a power of two from 16 to 512, then multiples of 256, at most the step's budget.
    It needs the kernel's decode attention; by default it is on with the kernel on CUDA only (on a CPU the kernel's
    op is its reference, which copies every token's slot)."""
    assert [packed_rows(n, 8192) for n in (1, 16, 17, 300, 512, 513, 1000, 8000)] == [
        16, 16, 32, 512, 512, 768, 1024, 8192
    ]  # fmt: skip
    assert packed_rows(9, 10) == 10 and packed_rows(700, 700) == 700
    assert not Engine(model, EngineConfig(max_batch=2)).packed_prefill  # sdpa on a CPU
    assert not Engine(model, EngineConfig(max_batch=2, decode_attention="triton")).packed_prefill  # a CPU
    assert Engine(model, EngineConfig(max_batch=2, decode_attention="triton", packed_prefill=True)).packed_prefill
    with pytest.raises(ConfigError, match="packed_prefill needs decode_attention='triton'"):
        Engine(model, EngineConfig(max_batch=2, packed_prefill=True))


def test_a_prefill_group_pads_to_a_bucket_only_up_to_prefill_graph_tokens(model):
    """Padded prefills (`prefill_graphs`): a group whose bucket (rows x width) holds at most
    `prefill_graph_tokens` pads to it; a larger one runs at its own size, unpadded (its arithmetic, not its
    launches, is what it costs); without padded prefills every group runs at its own size."""
    from llamita.inference.scheduler import Chunk

    def group(lengths: list[int]) -> list[Chunk]:
        return [Chunk(engine.add(list(range(1, n + 1)), GREEDY), 0, n) for n in lengths]

    engine = Engine(model, EngineConfig(max_batch=8, prefill_graphs=True, prefill_graph_tokens=64))
    assert engine.padded_prefill
    assert engine._shape(group([10])) == (2, 16, engine.attend(10), True)  # 2 x 16 = 32 padded tokens
    assert engine._shape(group([12, 9, 3])) == (4, 16, engine.attend(12), True)  # 4 x 16 = 64
    assert engine._shape(group([20, 5])) == (2, 32, engine.attend(20), True)  # 2 x 32 = 64
    assert engine._shape(group([40])) == (2, 40, 40, False)  # 2 x 48 (the slot) = 96 > 64: its own size
    assert engine._shape(group([12, 9, 3, 3, 2])) == (5, 12, 12, False)  # 8 x 16 = 128 > 64: its own size
    plain = Engine(model, EngineConfig(max_batch=8))
    assert not plain.padded_prefill  # on a CPU the default pads nothing (no CUDA graphs to replay)
    assert plain._shape(group([10])) == (2, 10, 10, False)


def test_chunked_prefill_of_a_long_prompt(model):
    engine = Engine(model, EngineConfig(prefill_tokens=4, max_batch=2))
    long, short = list(range(30)), [7, 7, 7]
    seqs, _ = run(engine, {0: [(long, GREEDY), (short, GREEDY)]})
    assert engine.stats.prefill_tokens == 33 and engine.stats.steps >= 33 // 4
    for seq in seqs:
        assert seq.output == greedy_by_recomputation(model, seq.prompt, seq.max_new)


def test_prefix_cache_reuses_a_shared_prefix_with_the_same_output(model):
    system = list(range(40, 60))  # 20 tokens: two blocks of 8
    asks = [system + [1, 2], system + [3], system + [4, 5, 6], [9, 9]]
    engine = Engine(model, EngineConfig(max_batch=2, prefix_cache=True, prefix_block=8))
    # The first runs alone; then two at once: one takes the free slot that holds the prefix, one copies it.
    seqs, _ = run(engine, {0: [(asks[0], GREEDY)], 14: [(a, GREEDY) for a in asks[1:3]], 15: [(asks[3], GREEDY)]})
    assert [s.reused for s in seqs] == [0, 16, 16, 0]
    assert engine.stats.reused_tokens == 32
    for seq in seqs:
        assert seq.output == greedy_by_recomputation(model, seq.prompt, seq.max_new)


def test_a_full_cache_queues_requests_and_every_one_finishes(model):
    engine = Engine(model, EngineConfig(max_batch=2, max_cache_tokens=2 * 48))
    ps = prompts(7, seed=3)
    seqs, most = run(engine, {0: [(p, SamplingParams(temperature=0.0, max_tokens=8)) for p in ps]})
    assert most == 2 and all(s.finished for s in seqs)
    assert [s.output for s in seqs] == [greedy_by_recomputation(model, p, 8) for p in ps]


def test_requests_that_cannot_fit_are_refused_at_once(model):
    engine = Engine(model, EngineConfig(max_seq_len=16))
    with pytest.raises(ConfigError, match="at most 15 tokens"):
        engine.add(list(range(16)), GREEDY)
    with pytest.raises(ConfigError, match="empty"):
        engine.add([], GREEDY)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        engine.add([1, TINY.vocab_size], GREEDY)
    assert not engine.has_work()
    with pytest.raises(ConfigError, match="no room for one sequence"):
        Engine(model, EngineConfig(max_cache_tokens=10))
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        Engine(model, EngineConfig(max_seq_len=TINY.max_seq_len + 1))


def test_output_ends_where_the_slot_ends(model):
    engine = Engine(model, EngineConfig(max_seq_len=20))
    seqs, _ = run(engine, {0: [(list(range(17)), SamplingParams(temperature=0.0, max_tokens=100))]})
    assert len(seqs[0].output) == 3 and seqs[0].finish_reason == "length"


def test_a_seed_gives_the_same_sample_whatever_the_batch(model):
    ours = ([5, 6, 7], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=11))
    alone, _ = run(Engine(model), {0: [ours]})
    crowd = [(p, SamplingParams(temperature=0.8, max_tokens=9)) for p in prompts(5, seed=4)]
    together, _ = run(Engine(model, EngineConfig(max_batch=3)), {0: crowd[:3], 1: [ours], 3: crowd[3:]})
    assert together[3].output == alone[0].output
    other_seed = ([5, 6, 7], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=12))
    assert run(Engine(model), {0: [other_seed]})[0][0].output != alone[0].output


def test_stop_ids_and_abort(model):
    free = greedy_by_recomputation(model, [5, 6], 12)
    stop = free[6]
    engine = Engine(model)
    seqs, _ = run(engine, {0: [([5, 6], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop,)))]})
    assert seqs[0].output == free[: free.index(stop) + 1] and seqs[0].finish_reason == "stop"
    eos = Engine(model, eos_id=stop)
    assert run(eos, {0: [([5, 6], GREEDY)]})[0][0].output == free[: free.index(stop) + 1]
    ignoring = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert run(eos, {0: [([5, 6], ignoring)]})[0][0].output == free
    seq = engine.add([5, 6], GREEDY)
    engine.step()
    engine.abort(seq)
    assert seq.finish_reason == "abort" and not engine.has_work()


def test_repetition_penalty_against_the_reference():
    model = tiny_model(std=0.1)  # small weights: without a penalty greedy decoding repeats itself
    params = SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.8)
    seqs, _ = run(Engine(model), {0: [([3, 3, 4], params), ([1, 2], GREEDY)]})
    assert seqs[0].output == greedy_by_recomputation(model, [3, 3, 4], 12, penalty=1.8)
    assert seqs[0].output != greedy_by_recomputation(model, [3, 3, 4], 12)
    assert seqs[1].output == greedy_by_recomputation(model, [1, 2], 12)


def test_presence_and_frequency_penalties_against_the_reference():
    model = tiny_model(std=0.1)
    presence = SamplingParams(temperature=0.0, max_tokens=12, presence_penalty=1.5)
    frequency = SamplingParams(temperature=0.0, max_tokens=12, frequency_penalty=0.7, repetition_penalty=1.2)
    engine = Engine(model, EngineConfig(max_batch=2))
    # A slot reused by a penalized request starts from no counts, and its neighbour's counts stay its own.
    seqs, _ = run(engine, {0: [([1, 2], GREEDY), ([3, 3, 4], presence)], 3: [([5, 6, 7], frequency)]})
    assert seqs[1].output == greedy_by_recomputation(model, [3, 3, 4], 12, presence=1.5)
    assert seqs[1].output != greedy_by_recomputation(model, [3, 3, 4], 12)
    assert seqs[2].output == greedy_by_recomputation(model, [5, 6, 7], 12, penalty=1.2, frequency=0.7)
    assert seqs[0].output == greedy_by_recomputation(model, [1, 2], 12)


def test_stream_yields_what_generate_returns(model):
    llm = LLM(model)
    params = SamplingParams(temperature=0.7, max_tokens=10, seed=3)
    assert list(llm.stream([1, 2, 3], params)) == llm.generate([1, 2, 3], params)[0].token_ids
    stream = llm.stream([1, 2, 3], params)
    next(stream)
    stream.close()  # leaving early frees the request
    assert not llm.engine.has_work()


def test_a_decode_step_reads_only_the_bucket_of_its_longest_sequence(model):
    """Attention reads the smallest read length that holds the batch's longest sequence (24 of the 48 positions
    while every sequence is shorter than 24), and the outputs stay those of the reference decoder."""
    engine = Engine(model, EngineConfig(max_batch=4))
    assert engine.buckets == [24, 48]
    reads, logits = [], engine._logits

    def recording(m, cache, tokens, positions):
        reads.append((cache.attend, int(positions.max()) + 1))
        return logits(m, cache, tokens, positions)

    engine._logits = recording
    ps = [[5, 6, 7], [8] * 15]
    seqs, _ = run(engine, {0: [(p, SamplingParams(temperature=0.0, max_tokens=20)) for p in ps]})
    for seq in seqs:
        assert seq.output == greedy_by_recomputation(model, seq.prompt, seq.max_new)
    longest = [max(len(p) + i for p in ps) for i in range(1, 20)]  # the decode steps' longest sequence
    assert [attend for attend, _ in reads] == [24 if n <= 24 else 48 for n in longest]


def test_prompts_of_scattered_slots_are_prefilled_in_one_forward(model):
    """Prompts that land in slots 0, 2 and 5 (the others decoding) go through one prefill forward, by index."""
    engine = Engine(model, EngineConfig(max_batch=6))
    keep = [engine.add(p, SamplingParams(temperature=0.0, max_tokens=30)) for p in prompts(6, seed=7)]
    engine.step()
    for seq in (keep[0], keep[2], keep[5]):
        engine.abort(seq)
    forwards, hidden = [], engine.model.hidden_states

    def recording(tokens, cache=None, start_pos=0, **kw):
        forwards.append(tuple(tokens.shape))
        return hidden(tokens, cache, start_pos, **kw)

    engine.model.hidden_states = recording
    try:
        new = [engine.add(p, SamplingParams(temperature=0.0, max_tokens=4)) for p in ([3, 1, 4, 1, 5],) * 3]
        engine.step()
    finally:
        del engine.model.hidden_states
    assert sorted(s.slot for s in new) == [0, 2, 5]
    assert forwards.count((3, 5)) == 1  # one forward of the three prompts; the decode step feeds 1 token a row
    while engine.has_work():
        engine.step()
    for seq in new + [keep[1], keep[3], keep[4]]:
        assert seq.output == greedy_by_recomputation(model, seq.prompt, seq.max_new)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_decode_as_the_eager_step(model):
    import warnings

    cuda = model.to("cuda")
    ps = prompts(6, seed=5)
    arrivals = {0: [(p, GREEDY) for p in ps[:4]], 3: [(p, GREEDY) for p in ps[4:]]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no step may run uncaptured
        graphed, _ = run(Engine(cuda, EngineConfig(max_batch=5, compile=False, overlap=False)), arrivals)
    eager, _ = run(Engine(cuda, EngineConfig(max_batch=5, cuda_graphs=False, overlap=False)), arrivals)
    assert [s.output for s in graphed] == [s.output for s in eager]
    # The defaults on a GPU: compiled, a graph of one row, steps launched ahead.
    default = Engine(cuda, EngineConfig(max_batch=5))
    compiled, _ = run(default, arrivals)
    assert [s.output for s in compiled] == [s.output for s in eager]
    assert default.overlap and default.stats.ahead_steps > 0 and default.graphs.sizes[0] == 1
    # Steps launched ahead land through pinned buffers and an event, which only a CUDA device has.
    ahead = Engine(cuda, EngineConfig(max_batch=5, compile=False, overlap=True))
    overlapped, _ = run(ahead, arrivals)
    assert [s.output for s in overlapped] == [s.output for s in eager] and ahead.stats.ahead_steps > 0
    model.to("cpu")


@pytest.mark.parametrize("fuse", [False, True])
def test_the_compiled_block_writes_the_cache_in_place(fuse):
    """Inductor's code for the decode step's block writes the new keys into the cache buffers and reads their
    first positions: it never copies a whole buffer (a scatter_ there was compiled as copy, scatter, copy back:
    two passes over every slot's keys and values per layer and step, 4x slower at 256 slots of 2048 positions);
    with the projections fused or not."""
    import re

    from torch._inductor.utils import run_and_get_code

    from llamita.model import ModelConfig

    model = tiny_model(ModelConfig(**{**TINY.__dict__, "n_layers": 1})).float()
    if fuse:  # as `LLM` serves on a GPU: q/k/v and gate/up as one matmul each
        model.fuse_projections()
    cache = SlotCache(model.config, 4, 48, device=torch.device("cpu"), dtype=torch.float32)
    view = cache.rows(0, 3, attend=24)  # a decode batch of 3 reading 24 of 48 positions
    tokens, positions = torch.tensor([[5], [7], [9]]), torch.tensor([[3], [10], [47]])
    block = torch.compile(block_step, fullgraph=True, dynamic=True)
    with torch.no_grad():
        got, codes = run_and_get_code(lambda: model_logits(model, view, tokens, positions, layer_fn=block))
        want = model_logits(model, SlotCache(model.config, 4, 48, device=torch.device("cpu"), dtype=torch.float32)
                            .rows(0, 3, attend=24), tokens, positions)  # fmt: skip
    torch.testing.assert_close(got, want)
    code = "\n".join(codes)
    assert "index_put" in code and not re.search(r"copy_\b|\.copy_\(", code), "the cache is copied, not written"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefill_graphs_decode_as_the_eager_engine(model):
    """Prefill forwards replayed from lazily captured CUDA graphs give the eager engine's outputs, the first time
    (capturing) and again (replaying the buckets captured)."""
    cuda = model.to("cuda")
    ps = prompts(6, seed=5)
    arrivals = {0: [(p, GREEDY) for p in ps[:4]], 3: [(p, GREEDY) for p in ps[4:]]}
    engine = Engine(cuda, EngineConfig(max_batch=5, compile=False, prefill_graphs=True))
    graphed, _ = run(engine, arrivals)
    assert engine.prefill_graphs is not None and engine.prefill_graphs.graphs
    captured = len(engine.prefill_graphs.graphs)
    again, _ = run(engine, arrivals)
    assert len(engine.prefill_graphs.graphs) == captured  # the same buckets: replayed, not captured again
    eager, _ = run(Engine(cuda, EngineConfig(max_batch=5, cuda_graphs=False)), arrivals)
    assert [s.output for s in graphed] == [s.output for s in eager] == [s.output for s in again]
    model.to("cpu")


@pytest.fixture
def dynamo_counters():
    """Dynamo's compile counters, from a clean cache (no graph of another test is reused or counted)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_the_compiled_block_decodes_as_the_eager_engine_from_few_compilations(model, dynamo_counters):
    """The engine's compiled path (on a CPU through dynamo's eager backend) gives the eager engine's outputs. The
    block compiles at startup, once for decoding and once for prefill, for every layer, batch size and read length
    (and the sampling once); a decode batch of one, which the CUDA graphs pad to two, compiles both once more."""
    ps, lengths = prompts(9), [3, 12, 7, 1, 9, 12, 5, 10, 2]
    arrivals: dict[int, list] = {0: [], 2: [], 5: []}
    for i, (p, n) in enumerate(zip(ps, lengths)):
        arrivals[[0, 2, 5][i % 3]].append((p, SamplingParams(temperature=0.0, max_tokens=n)))
    arrivals[6] = [(list(range(30)), SamplingParams(temperature=0.0, max_tokens=17))]  # reads all 48 positions
    eager, _ = run(Engine(model, EngineConfig(max_batch=4)), arrivals)
    engine = Engine(model, EngineConfig(max_batch=4, compile_backend="eager"))
    assert engine.buckets == [24, 48]
    assert dynamo_counters["stats"]["unique_graphs"] == 3
    reads, logits = [], engine._logits

    def recording(m, cache, tokens, positions):
        reads.append((cache.attend, tokens.shape[0]))
        return logits(m, cache, tokens, positions)

    engine._logits = recording
    compiled, most = run(engine, arrivals)
    assert most == 4 and {a for a, _ in reads} == {24, 48} and {b for _, b in reads} == {1, 3, 4}
    assert [s.output for s in compiled] == [s.output for s in eager]
    assert compiled[-1].output == greedy_by_recomputation(model, compiled[-1].prompt, 17)
    assert dynamo_counters["stats"]["unique_graphs"] == 5


def test_the_compiled_sampling_has_a_static_vocabulary_and_dynamic_batches(model):
    """The decode step's compiled sampling takes the vocabulary's size as a constant (with it symbolic, Inductor's
    kernel over the vocabulary took 0.8-1.2 ms a step on an H200, against 0.12-0.17 ms), and the batch size as a
    symbol: one compilation serves every batch, and the outputs are the eager engine's."""
    from torch._dynamo import register_backend

    shapes: list[list[tuple]] = []

    @register_backend(name="llamita_test_placeholder_shapes")
    def record(gm, example_inputs):  # noqa: ANN001
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        shapes.append([tuple(v.shape) for v in values if isinstance(v, torch.Tensor) and v.dim() == 2])
        return gm.forward

    ps = prompts(6, seed=3)
    arrivals = {0: [(p, GREEDY) for p in ps[:4]], 2: [(p, GREEDY) for p in ps[4:]]}
    eager, _ = run(Engine(model, EngineConfig(max_batch=4)), arrivals)
    engine = Engine(model, EngineConfig(max_batch=4, compile_backend="llamita_test_placeholder_shapes"))
    compiled, _ = run(engine, arrivals)
    assert [s.output for s in compiled] == [s.output for s in eager]
    sampling = [s for s in shapes if len(s) == 3]  # [B, V] logits, seen, counts (a block has 2-D inputs of 2)
    assert sampling and all(type(v) is int and v == TINY.vocab_size for s in sampling for _, v in s), sampling
    assert all(isinstance(b, torch.SymInt) for s in sampling for b, _ in s), sampling


def test_engines_of_other_models_in_one_process_each_compile_their_own_steps():
    """An engine compiles its block several times (decode, prefill, dtypes, flex attention); Dynamo allows a code
    object 8 compilations in all. Engines of other models and settings in one process (a notebook, an evaluation
    of several checkpoints, the test suite on a GPU) each compile a copy of their own: the third no longer fails
    with "recompile limit exceeded"."""
    import dataclasses

    for i in range(4):
        config = dataclasses.replace(TINY, dim=TINY.dim * (1 + i % 2), n_layers=1 + i % 2)
        model = tiny_model(config).float() if i % 2 else tiny_model(config)
        engine = Engine(model, EngineConfig(max_batch=3, compile_backend="eager",
                                            decode_attention="flex" if i == 3 else "sdpa"))  # fmt: skip
        (seq,), _ = run(engine, {0: [([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=3))]})
        assert seq.output == greedy_by_recomputation(model, [1, 2, 3], 3)


@pytest.mark.parametrize("kind", ["flex", "triton"])
@pytest.mark.parametrize("backend", [None, "eager"])
def test_decoding_rows_that_read_their_own_positions_decodes_as_the_reference(model, backend, kind, dynamo_counters):
    """`decode_attention="flex"` (FlexAttention's block mask) and `"triton"` (`llamita::decode_attention`: on a CPU
    the op's reference, on CUDA the kernel of tests/model/test_decode_attention.py): each decode row reads its own
    positions instead of its batch's bucket. Greedy outputs are the reference's, eagerly and through dynamo's
    compiled path, with requests joining and leaving and one reading past the first bucket. Compiled, neither
    compiles more than SDPA's dense mask: the same 3 graphs at start-up and 5 after
    (`test_the_compiled_block_decodes_as_the_eager_engine_from_few_compilations`): flex's block mask (a new one,
    with a new mask function, every step) and the custom op (a node of the block's graph) alike."""
    ps, lengths = prompts(9), [3, 12, 7, 1, 9, 12, 5, 10, 2]
    arrivals: dict[int, list] = {0: [], 2: [], 5: []}
    for i, (p, n) in enumerate(zip(ps, lengths)):
        arrivals[[0, 2, 5][i % 3]].append((p, SamplingParams(temperature=0.0, max_tokens=n)))
    arrivals[6] = [(list(range(30)), SamplingParams(temperature=0.0, max_tokens=17))]
    engine = Engine(model, EngineConfig(max_batch=4, decode_attention=kind, compile_backend=backend))
    assert engine.cache.kv.decode == kind and engine.cache.rows(0, 2).layer(0).decode == kind
    if backend:  # (eager FlexAttention on a CPU runs dynamo graphs of its own)
        assert dynamo_counters["stats"]["unique_graphs"] == 3
    seqs, most = run(engine, arrivals)
    assert most == 4
    for seq in seqs:
        assert seq.output == greedy_by_recomputation(model, seq.prompt, seq.max_new), seq.prompt
    if backend:
        assert dynamo_counters["stats"]["unique_graphs"] == 5


def test_unset_decode_attention_is_the_kernel_on_cuda_where_it_takes_the_heads(model):
    """`decode_attention=None` (the default): llamita's kernel on CUDA for heads of a power of 2 of at least 16
    dimensions (it beat cuDNN's on an H200, engine-r7), SDPA for other heads and on a CPU; a setting is kept."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [decode_attention_for(None, cuda, hd) for hd in (8, 16, 48, 64, 128)] == [
        "sdpa", "triton", "sdpa", "triton", "triton"
    ]  # fmt: skip
    assert decode_attention_for(None, cpu, 64) == "sdpa"
    assert decode_attention_for("flex", cuda, 64) == "flex" and decode_attention_for("triton", cpu, 8) == "triton"
    engine = Engine(model, EngineConfig(max_batch=2))
    assert engine.cache.kv.decode == "sdpa"


def test_flex_decode_attention_is_refused_where_it_cannot_compile():
    """Inductor's C++ FlexAttention template does not compile with dynamic shapes (torch 2.13): on a CPU, flex
    with Inductor is refused at once, naming what to use; an unknown value names the choices."""
    with pytest.raises(ConfigError, match="decode_attention is sdpa, flex, triton or unset"):
        EngineConfig(decode_attention="paged")
    with pytest.raises(ConfigError, match="compile_backend='eager'"):
        Engine(tiny_model().float(), EngineConfig(max_batch=2, decode_attention="flex", compile_backend="inductor"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["flex", "triton"])
def test_own_position_decode_graphs_decode_as_the_sdpa_engine(model, kind):
    """On CUDA, the compiled block with FlexAttention decoding (Inductor's Triton kernel) or llamita's decode kernel,
    replayed from CUDA graphs, gives the eager SDPA engine's outputs (float32: FlexAttention's kernels take no
    float64; heads of 16 dimensions, the least either kernel takes: fewer are a config error); with the kernel, the
    prompts are prefilled packed (its default) from graphs too. Flex warns that it is experimental: it crashed at
    the 1.1B shape (engine-r6)."""
    import copy
    import dataclasses

    refusal = {"flex": "at least 16 dimensions", "triton": "power of 2 of at least 16"}[kind]
    with pytest.raises(ConfigError, match=refusal):
        Engine(copy.deepcopy(model).to("cuda", torch.float32), EngineConfig(max_batch=2, decode_attention=kind))
    cuda = tiny_model(dataclasses.replace(TINY, dim=96)).to("cuda", torch.float32)  # 6 heads of 16
    ps = prompts(6, seed=5)
    arrivals = {0: [(p, GREEDY) for p in ps[:4]], 3: [(p, GREEDY) for p in ps[4:]]}
    eager, _ = run(Engine(cuda, EngineConfig(max_batch=5, cuda_graphs=False, decode_attention="sdpa")), arrivals)
    with pytest.warns(UserWarning, match="experimental on CUDA") if kind == "flex" else contextlib.nullcontext():
        engine = Engine(cuda, EngineConfig(max_batch=5, decode_attention=kind))
    own, _ = run(engine, arrivals)
    assert engine.graphs is not None and engine.graphs.uncaptured == 0
    assert [s.output for s in own] == [s.output for s in eager]
    if kind == "triton":  # its default prefill: packed, replayed from the graphs of its buckets of rows
        assert engine.packed_prefill and engine.prefill_graphs.graphs
        assert all(rows in (16, 32, 64, 128) for rows, _ in engine.prefill_graphs.graphs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_graph_of_one_row_decodes_as_the_eager_step(model):
    """`single_row`: a batch of one replays its own graph (compiled for one row under coordinate-descent tuning)
    instead of the graph of two, with the eager step's outputs."""
    import copy

    cuda = copy.deepcopy(model).to("cuda", torch.float32)
    arrivals = {0: [(prompts(1, seed=7)[0], GREEDY)]}
    eager, _ = run(Engine(cuda, EngineConfig(max_batch=4, cuda_graphs=False)), arrivals)
    engine = Engine(cuda, EngineConfig(max_batch=4, single_row=True))
    assert engine.graphs is not None and engine.graphs.sizes[0] == 1
    one, _ = run(engine, arrivals)
    assert engine.graphs.uncaptured == 0
    assert [s.output for s in one] == [s.output for s in eager]
