"""Loader tests. Every token of a test source is unique (source i holds ``i * BASE + arange``), so a window's
source and index can be read back from its first token."""

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from llamita.config import TrainConfig
from llamita.data.loader import DataLoader, eval_batches, feistel_permute
from llamita.data.mixture import Mixture, Stage
from llamita.data.shards import write_shard
from llamita.train.optim import BatchSchedule

BASE = 1_000_000
VOCAB = 1 << 22


def make_source(root: Path, index: int, lengths: list[int]) -> list[Path]:
    """Shards of a source whose tokens are ``index * BASE + 0, 1, 2, ...`` across all its shards."""
    paths, start = [], index * BASE
    for k, n in enumerate(lengths):
        path = root / f"src{index}" / f"shard_{k:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_shard(path, np.arange(start, start + n, dtype=np.int64), VOCAB)
        paths.append(path)
        start += n
    return paths


def decode(inputs: torch.Tensor, seq_len: int) -> list[tuple[int, int]]:
    """(source index, window index) of each row."""
    first = inputs[:, 0].tolist()
    return [(t // BASE, (t % BASE) // (seq_len + 1)) for t in first]


def rows(loader: DataLoader, n_batches: int) -> list[tuple[int, int]]:
    out = []
    for inputs, _ in islice(loader, n_batches):
        out += decode(inputs, loader.seq_len)
    return out


def global_windows(loaders: list[DataLoader], steps: int) -> torch.Tensor:
    """The windows (inputs plus the last target) that ranks 0..W-1 read in `steps` steps, in global sample order.

    Rank r reads the step's global positions r, r + W, r + 2W, ... (the loader's rule), so its k-th sample of a
    step is global sample ``k * W + r`` of that step.
    """
    world, gb, span = len(loaders), loaders[0].global_batch, loaders[0].seq_len + 1
    out = torch.empty(steps, gb // world, world, span, dtype=torch.int64)
    for r, loader in enumerate(loaders):
        batches = list(islice(loader, steps * loader.micro_steps_per_step))
        out[:, :, r] = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in batches]).view(steps, gb // world, span)
    return out.view(steps * gb, span)


@pytest.fixture
def two_sources(tmp_path):
    return {"a": make_source(tmp_path, 0, [400, 333, 267]), "b": make_source(tmp_path, 1, [500, 501])}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 97, 1000, 4099])
def test_feistel_is_a_bijection(n):
    for key in (0, 1, 123456789):
        perm = feistel_permute(np.arange(n), n, key)
        assert sorted(perm.tolist()) == list(range(n))


def test_feistel_keys_give_different_permutations():
    a, b = feistel_permute(np.arange(1000), 1000, 1), feistel_permute(np.arange(1000), 1000, 2)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, np.arange(1000))


def test_realised_proportions_match_weights(tmp_path):
    sources = {
        "slimpajama": make_source(tmp_path, 0, [8000]),
        "starcoderdata": make_source(tmp_path, 1, [8000]),
    }
    weights = {"slimpajama": 0.693584, "starcoderdata": 0.306416}
    loader = DataLoader(sources, Mixture.constant(weights), seq_len=7, micro_batch=50, global_batch=100, prefetch=0)
    picks = np.array([s for s, _ in rows(loader, 200)])
    assert picks.size == 10_000
    assert abs((picks == 0).mean() - weights["slimpajama"]) < 0.01


def test_ranks_interleaved_reproduce_the_single_rank_order(two_sources):
    mix = Mixture.constant({"a": 0.6, "b": 0.4})
    steps, gb = 6, 16
    single = rows(DataLoader(two_sources, mix, seq_len=9, micro_batch=4, global_batch=gb, prefetch=0), steps * 4)
    for world, micro in [(4, 2), (2, 2)]:
        loaders = [
            DataLoader(two_sources, mix, 9, micro, gb, rank=r, world_size=world, seed=0, prefetch=1)
            for r in range(world)
        ]
        assert loaders[0].micro_steps_per_step == gb // (micro * world)
        merged = decode(global_windows(loaders, steps), 9)
        assert merged == single, f"world_size {world}"
        for ld in loaders:
            ld.close()


def test_ramp_changes_proportions(two_sources):
    mix = Mixture([Stage(100, {"a": 1, "b": 0}, end_weights={"a": 0, "b": 1}), Stage(None, {"a": 0, "b": 1})])
    loader = DataLoader(two_sources, mix, seq_len=9, micro_batch=20, global_batch=20, prefetch=0)
    picks = np.array([s for s, _ in rows(loader, 110)]).reshape(110, 20)
    # Mean weight of b over steps 0-19 is 0.096, over steps 80-99 is 0.904.
    assert abs(picks[:20].mean() - 0.096) < 0.05
    assert abs(picks[80:100].mean() - 0.904) < 0.05
    assert picks[0].sum() == 0
    assert picks[100:].min() == 1


def test_every_window_once_per_epoch(tmp_path):
    n = 37  # prime, and not a multiple of global_batch, so epochs change mid-batch
    sources = {"a": make_source(tmp_path, 0, [n * 8 + 3]), "b": make_source(tmp_path, 1, [13 * 8])}
    loader = DataLoader(sources, Mixture.constant({"a": 3, "b": 1}), seq_len=7, micro_batch=6, global_batch=6)
    got = rows(loader, 60)
    loader.close()
    a = [w for s, w in got if s == 0]
    b = [w for s, w in got if s == 1]
    assert len(a) >= 3 * n and len(b) >= 2 * 13
    epochs = [a[e * n : (e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    assert sorted(b[:13]) == sorted(b[13:26]) == list(range(13))
    stats = loader.stats()
    assert stats["a"]["windows"] == n and stats["a"]["unused_tail_tokens"] == 3
    assert stats["a"]["epochs"] == len(a) // n and stats["b"]["draws"] == len(b)


def test_windows_span_shard_boundaries(tmp_path):
    seq_len = 4  # windows of 5 tokens over shards of 3, 11, 7, 26 tokens: 47 tokens -> 9 windows, tail 2
    sources = {"a": make_source(tmp_path, 0, [3, 11, 7, 26])}
    loader = DataLoader(sources, Mixture.constant({"a": 1}), seq_len=seq_len, micro_batch=3, global_batch=9)
    inputs, targets = (torch.cat(t) for t in zip(*islice(loader, 3), strict=True))
    loader.close()
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == (9, seq_len)
    starts = inputs[:, 0]
    assert sorted(starts.tolist()) == list(range(0, 45, 5))
    expected = starts[:, None] + torch.arange(seq_len)
    assert torch.equal(inputs, expected) and torch.equal(targets, expected + 1)
    assert loader.stats()["a"]["unused_tail_tokens"] == 2


def test_prefetch_does_not_change_the_stream(two_sources):
    mix = Mixture.constant({"a": 1, "b": 1})
    eager = DataLoader(two_sources, mix, 9, 4, 8, seed=3, prefetch=0)
    threaded = DataLoader(two_sources, mix, 9, 4, 8, seed=3, prefetch=3)
    for (x0, y0), (x1, y1) in zip(islice(eager, 21), islice(threaded, 21), strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    # Closed mid-step with batches prefetched: iterating again resumes after the last one handed out.
    threaded.close()
    assert rows(eager, 10) == rows(threaded, 10)
    threaded.close()


def test_seed_changes_the_stream(two_sources):
    mix = Mixture.constant({"a": 1, "b": 1})
    a = rows(DataLoader(two_sources, mix, 9, 4, 8, seed=0, prefetch=0), 10)
    b = rows(DataLoader(two_sources, mix, 9, 4, 8, seed=1, prefetch=0), 10)
    assert a != b


def test_resume_continues_exactly(two_sources):
    mix = Mixture([Stage(3, {"a": 1, "b": 3}), Stage(None, {"a": 3, "b": 1})])
    args = dict(seq_len=9, micro_batch=2, global_batch=8, seed=7, prefetch=2)
    reference = DataLoader(two_sources, mix, **args)
    expected = list(islice(reference, 40))
    reference.close()

    first = DataLoader(two_sources, mix, **args)
    list(islice(first, 12))  # 3 full steps of 4 micro-batches, with more prefetched behind them
    state = json.loads(json.dumps(first.state_dict()))  # plain Python types only
    first.close()
    assert state["sample"] == 24

    resumed = DataLoader(two_sources, mix, **args)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip(islice(resumed, 28), expected[12:], strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    resumed.close()


def test_state_mid_step_is_refused(two_sources):
    loader = DataLoader(two_sources, Mixture.constant({"a": 1, "b": 1}), 9, 2, 8, prefetch=0)
    next(loader)
    with pytest.raises(RuntimeError, match="middle of an optimizer step"):
        loader.state_dict()
    list(islice(loader, 3))
    assert loader.state_dict()["sample"] == 8


def awkward_resume_points(loader: DataLoader, steps: int) -> dict[str, int]:
    """Step boundaries of an uninterrupted run where a resume is awkward, found from its loader state.

    mid-epoch: every source inside its first epoch; epoch-end: a source's draws exactly a whole number of
    epochs; after-wrap: a source crossed into a new epoch in the middle of the last step; stage-boundary: the
    first step of the mixture's second stage.
    """
    windows = {name: s["windows"] for name, s in loader.stats().items()}
    draws = [dict.fromkeys(windows, 0)]
    for _ in range(steps):
        list(islice(loader, loader.micro_steps_per_step))
        draws.append(loader.state_dict()["draws"])
    loader.close()

    def first(predicate) -> int:
        found = [k for k in range(1, steps + 1) if predicate(draws[k - 1], draws[k])]
        assert found, "the test data never reaches this resume point"
        return found[0]

    return {
        "mid-epoch": first(lambda _, d: all(0 < d[s] < n for s, n in windows.items())),
        "epoch-end": first(lambda _, d: any(d[s] and d[s] % n == 0 for s, n in windows.items())),
        "after-wrap": first(lambda p, d: any(p[s] // n < d[s] // n and d[s] % n for s, n in windows.items())),
        "stage-boundary": loader.mixture.stages[0].steps,
    }


@pytest.mark.parametrize(("before", "after"), [(1, 1), (2, 1), (1, 2)], ids=["1-1", "2-1", "1-2"])
@pytest.mark.parametrize("point", ["mid-epoch", "epoch-end", "after-wrap", "stage-boundary"])
def test_resume_at_awkward_points_continues_the_global_order(tmp_path, point, before, after):
    """Stop at the point on `before` ranks, resume on `after`: the ranks together read exactly the windows of the
    uninterrupted single-rank run from there on, and every later epoch still covers every window of a source."""
    n_a, n_b = 37, 13  # windows of 8 tokens; not multiples of the global batch, so epochs end mid-step
    sources = {"a": make_source(tmp_path, 0, [100, 99, 100]), "b": make_source(tmp_path, 1, [50, 54])}
    mix = Mixture([Stage(4, {"a": 1, "b": 1}, end_weights={"a": 1, "b": 3}), Stage(None, {"a": 3, "b": 1})])
    gb, after_steps = 8, 16

    def loaders(world: int, prefetch: int) -> list[DataLoader]:
        return [
            DataLoader(sources, mix, 7, 2, gb, rank=r, world_size=world, seed=3, prefetch=prefetch)
            for r in range(world)
        ]

    stop = awkward_resume_points(loaders(1, 0)[0], 24)[point]
    (reference,) = loaders(1, 0)
    expected = global_windows([reference], stop + after_steps)

    first = loaders(before, prefetch=2)  # batches prefetched past the stop are dropped with the loader
    seen = global_windows(first, stop)
    states = [json.loads(json.dumps(ld.state_dict())) for ld in first]
    for ld in first:
        ld.close()
    assert all(state == states[0] for state in states) and states[0]["sample"] == stop * gb
    resumed = loaders(after, prefetch=1)
    for ld in resumed:
        ld.load_state_dict(states[0])
    seen = torch.cat([seen, global_windows(resumed, after_steps)])
    for ld in resumed:
        ld.close()
    assert torch.equal(seen, expected)

    picks = decode(seen, 7)
    for source, n in enumerate((n_a, n_b)):
        order = [w for s, w in picks if s == source]
        assert len(order) >= 2 * n
        for e in range(len(order) // n):
            assert sorted(order[e * n : (e + 1) * n]) == list(range(n)), f"source {source}, epoch {e}"


def test_changed_settings_or_data_are_refused(tmp_path, two_sources):
    mix = Mixture.constant({"a": 1, "b": 1})
    state = DataLoader(two_sources, mix, 9, 2, 8, seed=1, prefetch=0).state_dict()
    cases = [
        (DataLoader(two_sources, mix, 9, 2, 8, seed=2, prefetch=0), "seed changed from 1"),
        (DataLoader(two_sources, mix, 8, 2, 8, seed=1, prefetch=0), "seq_len changed from 9"),
        (DataLoader(two_sources, mix, 9, 2, 16, seed=1, prefetch=0), "global_batch changed from 8"),
    ]
    grown = {"a": two_sources["a"], "b": make_source(tmp_path / "other", 1, [500, 502])}
    cases.append((DataLoader(grown, mix, 9, 2, 8, seed=1, prefetch=0), "shards of source 'b' changed"))
    for loader, match in cases:
        with pytest.raises(ValueError, match=match):
            loader.load_state_dict(state)


def test_bad_configuration_is_refused(tmp_path, two_sources):
    mix = Mixture.constant({"a": 1, "b": 1})
    with pytest.raises(ValueError, match=r"multiple of micro_batch \* world_size"):
        DataLoader(two_sources, mix, 9, 3, 8, world_size=2)
    with pytest.raises(ValueError, match="mixture names sources"):
        DataLoader(two_sources, Mixture.constant({"a": 1}), 9, 2, 8)
    with pytest.raises(ValueError, match="source 'a' has 10 tokens"):
        DataLoader({"a": make_source(tmp_path / "short", 0, [10])}, Mixture.constant({"a": 1}), 10, 1, 1)


def test_eval_batches_are_deterministic_and_rank_strided(tmp_path):
    shards = make_source(tmp_path, 0, [50, 27, 30])  # 107 tokens, seq_len 4 -> 21 windows
    everything = list(eval_batches(shards, seq_len=4, batch_size=4))
    again = list(eval_batches(shards, seq_len=4, batch_size=4))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(everything, again, strict=True))
    starts = torch.cat([x for x, _ in everything])[:, 0].tolist()
    assert starts == list(range(0, 105, 5))
    x, y = everything[1]
    assert torch.equal(y, x + 1) and x.shape == (4, 4)

    per_rank = [list(eval_batches(shards, 4, 4, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 10 windows each; the 21st is dropped
    for r in range(2):
        assert torch.cat([x for x, _ in per_rank[r]])[:, 0].tolist() == list(range(5 * r, 100, 10))
    assert len(list(eval_batches(shards, 4, 4, max_batches=2))) == 2


def step_windows(loaders: list[DataLoader], steps: int) -> list[list[tuple[int, int]]]:
    """Per step, the (source, window) of each global sample in global order, each rank reading the micro-batches
    its loader says the step has (rank r's k-th sample of a step is the step's global sample k * W + r)."""
    out = []
    for _ in range(steps):
        per_rank = [
            decode(torch.cat([next(ld)[0] for _ in range(ld.micro_steps_per_step)]), ld.seq_len) for ld in loaders
        ]
        out.append([row for k in range(len(per_rank[0])) for row in (p[k] for p in per_rank)])
    return out


def schedule(first: int, *stages: tuple[int, int]) -> BatchSchedule:
    """A batch schedule in tokens: `first` from 0, then (from_tokens, batch) stages."""
    later = [{"from_tokens": t, "global_batch_tokens": b} for t, b in stages]
    return BatchSchedule.of(TrainConfig(global_batch_tokens=first, batch_stages=later))


def test_each_step_takes_the_batch_of_the_schedule(two_sources):
    """8 sequences of 9 tokens per step, 16 from the step at 216 tokens (after 3 steps), 32 from 500 tokens on: the
    accumulation follows, and with a constant mixture the samples are the fixed-batch loader's, in order."""
    mix = Mixture.constant({"a": 2, "b": 1})
    sizes = schedule(72, (216, 144), (500, 288))
    loader = DataLoader(two_sources, mix, 9, 2, 8, world_size=1, seed=5, prefetch=1, batch_schedule=sizes)
    accum = []
    for _ in range(7):
        accum.append(loader.micro_steps_per_step)
        list(islice(loader, loader.micro_steps_per_step))
    loader.close()
    assert accum == [4, 4, 4, 8, 8, 16, 16]  # 216 + 2 x 144 = 504 >= 500: the third stage starts at step 5

    ranks = [
        DataLoader(two_sources, mix, 9, 2, 8, rank=r, world_size=2, seed=5, prefetch=0, batch_schedule=sizes)
        for r in (0, 1)
    ]
    staged = step_windows(ranks, 7)
    assert [len(s) for s in staged] == [8, 8, 8, 16, 16, 32, 32]
    fixed = rows(DataLoader(two_sources, mix, 9, 8, 8, seed=5, prefetch=0), 15)
    assert [w for s in staged for w in s] == fixed


@pytest.mark.parametrize(("before", "after"), [(1, 2), (2, 1)], ids=["1-2", "2-1"])
@pytest.mark.parametrize("stop", [2, 3, 5], ids=["before-the-change", "at-the-change", "after-the-change"])
def test_resume_across_a_batch_change_continues_exactly(two_sources, stop, before, after):
    """A staged mixture counts steps, not samples, across a batch change; a resume at any step is exact."""
    mix = Mixture([Stage(4, {"a": 1, "b": 0}), Stage(None, {"a": 0, "b": 1})])
    sizes = schedule(72, (216, 144))

    def loaders(world: int) -> list[DataLoader]:
        return [
            DataLoader(two_sources, mix, 9, 2, 8, rank=r, world_size=world, seed=1, prefetch=2, batch_schedule=sizes)
            for r in range(world)
        ]

    expected = step_windows(loaders(1), 8)
    assert [{s for s, _ in step} for step in expected] == [{0}] * 4 + [{1}] * 4
    first = loaders(before)
    seen = step_windows(first, stop)
    states = [json.loads(json.dumps(ld.state_dict())) for ld in first]
    for ld in first:
        ld.close()
    assert states[0]["step"] == stop and states[0]["sample"] == sizes.tokens_after(stop) // 9
    resumed = loaders(after)
    for ld in resumed:
        ld.load_state_dict(states[0])
    assert seen + step_windows(resumed, 8 - stop) == expected

    other = DataLoader(two_sources, mix, 9, 2, 8, seed=1, batch_schedule=schedule(72, (50, 144)))
    with pytest.raises(ValueError, match="keep the batches of the steps before it"):
        other.load_state_dict(states[0])  # the parent's step 5 started elsewhere


def test_a_branch_starts_a_new_data_order_at_the_parents_position(tmp_path, two_sources):
    """A branch continues the sample and step counts and the draws of a source it shares with the parent (its
    windows go on in the parent's order, here through an epoch end, though the source's index changed), starts a
    new source at its first draw, counts its mixture's stages from its first step, and resumes exactly."""
    parent = DataLoader(two_sources, Mixture.constant({"a": 1, "b": 1}), 9, 2, 8, seed=4, prefetch=0)
    list(islice(parent, 4 * 5))
    state = json.loads(json.dumps(parent.state_dict()))
    parent_next_b = [w for s, w in rows(parent, 4 * 40) if s == 1]  # what the parent reads next from b

    sources = {"b": two_sources["b"], "c": make_source(tmp_path, 2, [300])}  # b is source 0 here, 1 in the parent
    mix = Mixture([Stage(3, {"b": 1, "c": 0}), Stage(None, {"b": 1, "c": 1})])
    branch = DataLoader(sources, mix, 9, 2, 8, seed=4, prefetch=0)
    assert branch.branch_from(state) == {"b": state["draws"]["b"]}
    steps = step_windows([branch], 20)
    assert all(s == 1 for step in steps[:3] for s, _ in step)  # the first stage: the branch's first 3 steps
    branch_b = [w for step in steps for s, w in step if s == 1]
    assert branch_b == parent_next_b[: len(branch_b)] and len(branch_b) > 100 - state["draws"]["b"]  # an epoch end
    c = [w for step in steps for s, w in step if s == 2]
    assert len(c) >= 60 and all(sorted(c[e * 30 : (e + 1) * 30]) == list(range(30)) for e in (0, 1))  # 30 windows
    mid = json.loads(json.dumps(branch.state_dict()))
    assert (mid["step"], mid["start_step"], mid["sample"]) == (25, 5, 25 * 8)
    rest = step_windows([branch], 6)

    again = DataLoader(sources, mix, 9, 2, 8, seed=4, prefetch=2)
    again.load_state_dict(mid)
    assert step_windows([again], 6) == rest
    again.close()
    with pytest.raises(ValueError, match="seq_len changed from 9"):
        DataLoader(sources, mix, 8, 2, 8, seed=4).branch_from(state)
