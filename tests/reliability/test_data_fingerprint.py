"""Resume refuses training data that changed since the checkpoint, unless checkpoint.allow_data_change is set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llamita.data.shards import read_shard, write_shard
from llamita.pretrain import pretrain
from llamita.train import checkpoint as ckpt

FAST = {"train.threads": "1", "eval.interval": "0", "checkpoint.interval": "2", "checkpoint.keep_last": "0"}


@pytest.fixture
def run_on_copy(private_prose, debug_config, tmp_path):
    """A 4-step run on a private copy of the prose source, cut after step 2; returns (config factory, copied source
    dir)."""
    sources, prose = private_prose

    def make(steps: int, **overrides: str):
        values = {**FAST, "data.sources": sources, "train.max_steps": str(steps), **overrides}
        return debug_config(tmp_path / "run", **values)

    pretrain(make(4))
    shutil.rmtree(ckpt.checkpoint_path(tmp_path / "run", 4))
    return make, prose


def train_shards(source: Path) -> tuple[dict, list[dict]]:
    manifest = json.loads((source / "manifest.json").read_text())
    return manifest, [s for s in manifest["shards"] if s["split"] == "train"]


def test_replaced_shard_is_refused_unless_allowed(run_on_copy):
    """The same file name and size, other tokens (as `llamita prepare` on edited input would write)."""
    make, prose = run_on_copy
    manifest, shards = train_shards(prose)
    entry = shards[0]
    path = prose / entry["file"]
    tokens = read_shard(path)
    size = path.stat().st_size
    entry["sha256"] = write_shard(path, np.roll(tokens, 1), vocab_size=manifest["tokenizer"]["vocab_size"])
    assert path.stat().st_size == size
    (prose / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ckpt.CheckpointError, match=r"shards of source 'prose' changed.*allow_data_change") as info:
        pretrain(make(4))
    assert Path(entry["file"]).name in str(info.value)
    assert pretrain(make(4, **{"checkpoint.allow_data_change": "true"}))["step"] == 4


def test_removed_shard_is_refused(run_on_copy):
    make, prose = run_on_copy
    manifest, shards = train_shards(prose)
    gone = shards[-1]
    manifest["shards"].remove(gone)
    (prose / gone["file"]).unlink()
    (prose / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="shards of source 'prose' changed") as info:
        pretrain(make(4))
    assert Path(gone["file"]).name in str(info.value)
