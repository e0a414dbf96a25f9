"""Whole-checkpoint equality for the resume tests: model, optimizer, RNG and trainer state, bit for bit."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from llamita.train import checkpoint as ckpt


def checkpoint_contents(folder: Path) -> dict[str, Any]:
    """Everything a checkpoint folder holds, gathered into one process: {"dcp": model and optimizer state (whole,
    however many ranks saved it), "rng": {file: RNG states}, "trainer": trainer_state.json without its timestamp
    and run folder}."""
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.pt"
        dcp_to_torch_save(folder, whole)
        dcp = torch.load(whole, weights_only=True)
    rng = {p.name: torch.load(p, weights_only=True) for p in sorted(folder.glob("rng_rank*.pt"))}
    trainer = json.loads((folder / ckpt.STATE_FILE).read_text())
    trainer.pop("saved_at")
    trainer["run_config"].pop("out_dir")  # two runs compared live in two folders
    return {"dcp": dcp, "rng": rng, "trainer": trainer}


def assert_same(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Recursive equality: tensors with torch.equal (dtype and shape included), everything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Two checkpoint folders hold the same model, optimizer (moments and step counts), RNG and trainer state."""
    contents_a, contents_b = checkpoint_contents(a), checkpoint_contents(b)
    assert contents_a["dcp"]["optim"]["state"], "no optimizer state to compare"
    assert contents_a["rng"], "no RNG state to compare"
    assert_same(contents_a, contents_b)
