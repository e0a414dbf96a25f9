"""Damaged token shards stop `pretrain` before its first step, with an error naming the shard and what to do.

Headers and sizes are checked when the data is opened; out-of-range token ids by the start-up scan of
`data.verify_tokens`, which each rank runs over its share of the shards.
"""

from __future__ import annotations

import pytest

from llamita.data.prepare import shard_paths
from llamita.data.shards import ShardError
from llamita.pretrain import pretrain
from pretrain_runs import finish, torchrun
from shard_damage import BAD_TOKEN_POSITION, damage

FAST = {"train.threads": "1", "eval.interval": "0", "checkpoint.interval": "0", "train.max_steps": "2"}
KINDS = {
    "bad magic": "not a llamita token shard",
    "dtype inconsistent with vocab": "does not match the header's vocab size",
    "truncated": "truncated",
    "token >= vocab": f"token id 400 .first bad one at position {BAD_TOKEN_POSITION}. is outside the vocabulary "
    r"\[0, 400\) .vocab size 400.",
}


@pytest.fixture
def on_copy(private_prose, debug_config, tmp_path):
    """A config factory for runs on a private copy of the prose source; returns (factory, copied source dir)."""
    sources, prose = private_prose

    def make(**overrides: str):
        return debug_config(tmp_path / "run", **{**FAST, "data.sources": sources, **overrides})

    return make, prose


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_damaged_shard_stops_the_run_before_training(on_copy, kind, split):
    make, prose = on_copy
    victim = shard_paths(prose, split)[-1]
    damage(kind, victim)
    with pytest.raises(ShardError, match=KINDS[kind]) as info:
        pretrain(make())
    assert str(victim) in str(info.value) and "re-run `llamita prepare`" in str(info.value)
    assert not (prose.parent / "run" / "metrics.jsonl").exists()  # training never started


def test_out_of_range_token_is_not_scanned_for_when_verify_tokens_is_off(on_copy, monkeypatch):
    """`data.verify_tokens=false` skips the scan (headers are still checked): the run gets as far as training."""
    make, prose = on_copy
    damage("token >= vocab", shard_paths(prose, "val")[-1])
    started = []
    monkeypatch.setattr("llamita.pretrain.Trainer.fit", lambda self: started.append(True) or {})
    pretrain(make(**{"data.verify_tokens": "false"}))
    assert started
    damage("bad magic", shard_paths(prose, "val")[-1])
    with pytest.raises(ShardError, match="not a llamita token shard"):
        pretrain(make(**{"data.verify_tokens": "false"}))


def test_both_ranks_stop_when_one_finds_a_bad_token(on_copy):
    """Rank 1 scans the second shard of the list; rank 0 must stop with its error too, not wait in a collective."""
    make, prose = on_copy
    victim = shard_paths(prose, "train")[1]
    damage("token >= vocab", victim)
    out = finish(torchrun(make()), ok=False)
    assert out.count(f"{victim}: token id 400") == 2, out[-6000:]
